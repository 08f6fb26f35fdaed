"""Colour and failure statistics of images: pure-white share, saturation, colorfulness, brightness.

    image_stats(img)                  -> per-image dict (the library function other modules use)
    folder_stats(folder)              -> means over a folder of images
    failure_flags(stats, reference)   -> the seed's v3.0-vpred failure modes, with reasons

The colour statistics themselves (saturation and brightness 0..255, Hasler-Suesstrunk colorfulness) are
the ones the data pipeline computes for control tokens (lumina_illus.data.control), so generated samples
and training data are measured the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lumina_illus.data.control import METRICS, color_stats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STAT_KEYS = ("white_frac", "black_frac", *METRICS)


def image_stats(img: Image.Image) -> dict[str, float]:
    """Per-image statistics: white_frac / black_frac (share of pixels exactly #FFFFFF / #000000, on the
    full-resolution image) plus the data pipeline's colour statistics (lumina_illus.data.control:
    brightness, contrast, sharpness, dynamic_range, colorfulness, saturation_mean, saturation_std)."""
    rgb = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    return {
        "white_frac": float((rgb == 255).all(-1).mean()),
        "black_frac": float((rgb == 0).all(-1).mean()),
        **color_stats(img),
    }


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_stats(folder: str | Path, progress: bool = True) -> dict[str, Any]:
    """Mean of each image_stats() value over the images of a folder (recursive), plus per-image rows."""
    rows = []
    for p in tqdm(list_images(folder), desc=f"stats {Path(folder).name}", unit="img", disable=not progress):
        try:
            with Image.open(p) as im:
                rows.append({"file": str(p), **image_stats(im)})
        except OSError as e:
            raise ValueError(f"{p}: cannot read image: {e}") from None
    means = {k: float(np.mean([r[k] for r in rows])) for k in STAT_KEYS}
    return {"folder": str(folder), "images": len(rows), **means, "per_image": rows}


@dataclass(frozen=True)
class FailureThresholds:
    white_abs: float = 0.5  # share of pure-white pixels flagged even without a reference (seed: 58.46%)
    white_margin: float = 0.2  # ...or this much above the reference's share
    saturation_abs: float = 150.0  # mean HSV saturation (0..255) flagged without a reference
    saturation_ratio: float = 1.25  # ...or this many times the reference's
    colorfulness_ratio: float = 1.5  # colorfulness this many times the reference's


def failure_flags(
    stats: Mapping[str, Any], reference: Mapping[str, Any] | None = None,
    thresholds: FailureThresholds = FailureThresholds(),
) -> dict[str, str]:
    """The seed's v3.0-vpred failure modes found in `stats` (folder_stats output): {"flag": "reason"}.

    white_collapse: too many exactly-white pixels; oversaturation: saturation or colorfulness far above
    the reference (or above an absolute level when no reference is given)."""
    th = thresholds
    flags = {}
    w = stats["white_frac"]
    if w >= th.white_abs:
        flags["white_collapse"] = f"{w:.2%} of pixels are exactly #FFFFFF (>= {th.white_abs:.0%})"
    elif reference is not None and w >= reference["white_frac"] + th.white_margin:
        flags["white_collapse"] = f"{w:.2%} pure-white pixels vs {reference['white_frac']:.2%} in the reference"
    s = stats["saturation_mean"]
    if reference is None:
        if s >= th.saturation_abs:
            flags["oversaturation"] = f"mean saturation {s:.1f} >= {th.saturation_abs:.0f}"
    else:
        rs, rc = reference["saturation_mean"], reference["colorfulness"]
        if s >= th.saturation_ratio * rs:
            flags["oversaturation"] = f"mean saturation {s:.1f} vs {rs:.1f} in the reference (x{s / max(rs, 1e-9):.2f})"
        elif stats["colorfulness"] >= th.colorfulness_ratio * rc:
            flags["oversaturation"] = f"colorfulness {stats['colorfulness']:.1f} vs {rc:.1f} in the reference"
    return flags
