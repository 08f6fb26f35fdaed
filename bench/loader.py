"""python bench/loader.py [--images 64] [--repeats 3] [--workers 2] [--model-rate 5.5]

Decoded + bucketed images per second per core: our pipeline (lumina_illus.data.build_loader, run
with num_workers=0 so that it uses exactly one core) against a naive PIL loop (open, exif
transpose, convert, full-size Lanczos resize, crop, tensor) over the same shards, in the same
process, alternating runs. Shards: synthetic illustration-like JPEGs of 1-9 MP (danbooru-like
sizes, some large originals), written once to a temporary folder, or --shards. Prints the per-core rates, their ratio,
the multi-worker rate, and the CPU cores needed to feed one GPU training at --model-rate images/s
(BENCHMARKS.md, model section: 5.5-6.9 images/s per H100 for the 2.6B model at 1024^2).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import DataConfig  # noqa: E402
from lumina_illus.data import build_loader, write_shards  # noqa: E402
from lumina_illus.data.buckets import assign_bucket  # noqa: E402
from lumina_illus.data.shards import IMAGE_EXTS  # noqa: E402

# (w, h): SDXL-size renders, phone/monitor sizes and large originals (A4 at 300 dpi, 3000 px scans)
SIZES = [(1216, 832), (1500, 1000), (2048, 1448), (1280, 1280), (1920, 1080), (2480, 3508), (3000, 2000),
         (1024, 1536)]


def synthetic_image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Flat-shaded shapes over a gradient: compresses and decodes like an illustration, not like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, np.full_like(x, rng.uniform(0, 255))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        r = int(rng.uniform(20, min(w, h) / 4))
        d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)),
                  outline=(0, 0, 0), width=3)
    return img


def make_shards(out: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)

    def samples():
        for i in tqdm(range(n), desc="synthetic shards"):
            w, h = SIZES[i % len(SIZES)]
            buf = io.BytesIO()
            synthetic_image(w, h, rng).save(buf, "JPEG", quality=92)
            yield {"__key__": f"{i:06d}", "jpg": buf.getvalue(),
                   "json": {"tags": {"character": ["someone"], "general": ["smile", "long_hair"]},
                            "width": w, "height": h}}

    m = write_shards(samples(), out, samples_per_shard=16)
    return [str(out / s["name"]) for s in m["shards"]]


def naive_loop(urls: list[str], cfg: DataConfig, n: int) -> float:
    """Images/s of the straightforward loop, one core."""
    t0, done = time.perf_counter(), 0
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
                    continue
                img = Image.open(io.BytesIO(tar.extractfile(m).read()))
                img = ImageOps.exif_transpose(img).convert("RGB")
                bh, bw = assign_bucket(cfg, img.height, img.width)
                s = max(bw / img.width, bh / img.height)
                rw, rh = max(bw, round(img.width * s)), max(bh, round(img.height * s))
                img = img.resize((rw, rh), Image.Resampling.LANCZOS)
                top, left = (rh - bh) // 2, (rw - bw) // 2
                img = img.crop((left, top, left + bw, top + bh))
                x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
                assert x.shape[1:] == (bh, bw)
                done += 1
                if done == n:
                    return n / (time.perf_counter() - t0)
    return done / (time.perf_counter() - t0)


def ours(cfg: DataConfig, n: int) -> float:
    """Images/s of build_loader's iterator over n images (after the first batch: start-up excluded)."""
    it = iter(build_loader(cfg, micro_batch=64, rank=0, world_size=1, seed=0))
    got = len(next(it))
    t0, start = time.perf_counter(), got
    while got < n + start:
        got += len(next(it))
    return (got - start) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each loader (median reported)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the multi-process run (0: skip)")
    ap.add_argument("--model-rate", type=float, default=5.5, help="images/s one GPU trains (1024^2, 2.6B)")
    ap.add_argument("--shards", nargs="*", default=None, help="existing shards instead of synthetic ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        urls = args.shards or make_shards(Path(tmp), max(args.images * 2, 32))
        cfg = DataConfig(shards=urls, num_workers=0, shuffle_buffer=8, batching="tokens", token_budget=16384,
                         caption={"caption_dropout": 0.0})
        naive_r, ours_r = [], []
        for _ in tqdm(range(args.repeats), desc="alternating runs"):
            naive_r.append(naive_loop(urls, cfg, args.images))
            ours_r.append(ours(cfg, args.images))
        multi = None
        if args.workers:
            mcfg = DataConfig(**{**cfg.__dict__, "num_workers": args.workers})
            multi = ours(mcfg, args.images * 2)
    naive_m, ours_m = statistics.median(naive_r), statistics.median(ours_r)
    result = {
        "machine": f"{os.cpu_count()} cores visible; {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip() if os.path.exists('/proc/cpuinfo') else '?'}",
        "images_per_run": args.images,
        "naive_img_s_per_core": round(naive_m, 2),
        "ours_img_s_per_core": round(ours_m, 2),
        "ratio": round(ours_m / naive_m, 2),
        "runs_naive": [round(r, 2) for r in naive_r],
        "runs_ours": [round(r, 2) for r in ours_r],
        f"ours_img_s_{args.workers}_workers": round(multi, 2) if multi else None,
        "model_rate_img_s_per_gpu": args.model_rate,
        "cores_per_gpu": math.ceil(args.model_rate / ours_m * 10) / 10,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
