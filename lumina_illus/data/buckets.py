"""Aspect buckets: which (height, width) an image is trained at, and the resize + crop into it.

Area levels are squares of side sqrt(min_area) .. sqrt(max_area) in steps of `area_step` px (plus
max_area itself). An image goes to the level nearest its own area (in log space; larger images to
max_area, smaller ones to min_area), then to the bucket of that level whose aspect ratio is nearest
its own (in log space). The buckets of one level have sides that are multiples of `bucket_step`, area <= the
level, and aspect <= max_aspect (the NovelAI scheme, at several areas).
"""

from __future__ import annotations

import functools
import math
import random

from PIL import Image

from lumina_illus.config import DataConfig

Bucket = tuple[int, int]  # (height, width) in pixels


def _key(cfg: DataConfig) -> tuple:
    return (cfg.min_area, cfg.max_area, cfg.area_step, cfg.bucket_step, cfg.max_aspect)


def area_levels(cfg: DataConfig) -> list[int]:
    """Target areas in pixels, ascending."""
    return list(_levels(_key(cfg)))


@functools.lru_cache(maxsize=64)
def _levels(key: tuple) -> tuple[int, ...]:
    min_area, max_area, area_step, _, _ = key
    lo, hi = math.isqrt(min_area), math.isqrt(max_area)
    levels = {min_area, max_area} | {s * s for s in range(lo, hi + 1, area_step) if min_area <= s * s <= max_area}
    return tuple(sorted(levels))


@functools.lru_cache(maxsize=256)
def _level_buckets(area: int, step: int, max_aspect: float) -> tuple[Bucket, ...]:
    out = set()
    w = step
    while w * step <= area:
        h = (area // w) // step * step  # tallest side that keeps the area <= level
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            out.add((h, w))
            out.add((w, h))
        w += step
    return tuple(sorted(out))


def level_buckets(cfg: DataConfig, area: int) -> list[Bucket]:
    return list(_level_buckets(area, cfg.bucket_step, cfg.max_aspect))


def all_buckets(cfg: DataConfig) -> list[Bucket]:
    """Every bucket of every level, sorted by area then aspect."""
    out = {b for a in area_levels(cfg) for b in level_buckets(cfg, a)}
    return sorted(out, key=lambda b: (b[0] * b[1], b[1] / b[0]))


def assign_bucket(cfg: DataConfig, height: int, width: int) -> Bucket:
    """The bucket of an image of this size (see module docstring)."""
    area = height * width
    # nearest level in log-area: a 1216x832 image (0.96 of 1024^2) stays at 1024^2 instead of
    # dropping to 768^2; the upscale this allows is at most the square root of two levels' ratio
    level = min(area_levels(cfg), key=lambda a: (round(abs(math.log(a / area)), 9), a))  # ties: the smaller
    target = math.log(width / height)
    buckets = level_buckets(cfg, level)
    # nearest aspect; among equals the larger area (less resolution lost)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), -b[0] * b[1]))


def image_tokens(cfg: DataConfig, bucket: Bucket) -> int:
    """Image tokens of a bucket: (H / patch_px) * (W / patch_px)."""
    p = cfg.patch_tokens_per_side
    return (bucket[0] // p) * (bucket[1] // p)


def resize_and_crop(img: Image.Image, bucket: Bucket, rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the bucket is covered, then crop to it. Returns the image and the crop's (top, left)
    in resized pixels, as SDXL's crop conditioning expects. Centre crop unless `rng` is given."""
    bh, bw = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        # reducing_gap: decode-time box reduction first, then Lanczos; much faster for big downscales
        img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    if (rw, rh) != (bw, bh):
        img = img.crop((left, top, left + bw, top + bh))
    return img, (top, left)
