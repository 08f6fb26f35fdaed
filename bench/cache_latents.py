"""python bench/cache_latents.py [--images 48] [--size 256] [--repeats 2] [--mfu 0.3 0.5]

1. data/cache_latents.py on CPU with the tiny Flux-architecture VAE (lumina_illus.models.tiny), run as
   users run it: one process, then two processes (RANK/WORLD_SIZE, each one intra-op thread), alternating,
   over the same --images synthetic images of --size^2 in 8 input shards. Prints images/s per process
   (samples / seconds the process spent inside shards, from the done markers: no interpreter start or
   model load) and end to end (wall clock of the whole command), and the ratio of 2 processes to 1.
2. FLOPs of the real Flux VAE encoder (FLUX_VAE config, random weights on the meta device: no memory, no
   compute) counted by torch.utils.flop_counter at 1024^2 (and at 256^2 scaled by pixels, to show what
   the quadratic mid-block attention adds), and the arithmetic for encoding 22M images on H100s at the
   given MFUs (bf16 dense peak 989 TFLOP/s). Arithmetic, not a measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lumina_illus.data.shards import write_shards  # noqa: E402
from lumina_illus.models.tiny import FLUX_VAE, make_tiny_flux_vae  # noqa: E402

H100_BF16_PEAK = 989e12  # FLOP/s, dense
N_IMAGES_REAL = 22e6  # the seed's image samples


def make_inputs(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"img{i:05d}", "png": buf.getvalue(), "json": {"tags": ["x"]}})
    write_shards(samples, root / "in", max(1, n // 8))
    make_tiny_flux_vae(root / "vae")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({"family": "lumina2", "model": {"arch": {"preset": "tiny"}, "vae": {"path": str(root / "vae")}},
                                   "data": {"shards": [str(root / "in" / "shard-*.tar")], "min_area": size * size,
                                            "max_area": size * size, "num_workers": 0}}))
    return cfg


def run(cfg: Path, out: Path, world: int) -> tuple[float, list[float]]:
    """(wall seconds, images/s of each process inside its shards)."""
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "data" / "cache_latents.py"), str(cfg), str(out), "--device", "cpu",
           "--threads", "1", "--dtype", "bf16"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env={**env, **({"RANK": str(r), "WORLD_SIZE": str(world)} if world > 1 else {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"cache_latents failed:\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    markers = [json.loads(p.read_text()) for p in (out / "done").glob("*.json")]
    rates = []
    for r in range(world):
        mine = [m for m in markers if m["rank"] == r]
        rates.append(sum(m["samples"] for m in mine) / sum(m["seconds"] for m in mine))
    return wall, rates


def encoder_flops(size: int) -> float:
    """Forward FLOPs of the Flux VAE encoder (encode -> latent distribution) for one size^2 image."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE)
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vae.encode(x)
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (also the bucket: no resize)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.5], help="assumed H100 MFUs for the arithmetic")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_inputs(Path(tmp), args.images, args.size)
        res: dict[int, list[tuple[float, list[float]]]] = {1: [], 2: []}
        for rep in range(args.repeats):  # alternating, so that machine load hits both alike
            for world in (1, 2):
                res[world].append(run(cfg, Path(tmp) / f"out{world}_{rep}", world))
    print(f"cache_latents on CPU, tiny Flux-architecture VAE, {args.images} images of {args.size}^2, "
          f"1 intra-op thread per process, {os.cpu_count()} cores, {args.repeats} alternating repeats (median)")
    print(f"{'processes':>10} {'img/s per process':>18} {'img/s total':>12} {'wall s':>8} {'img/s end to end':>17}")
    row = {}
    for world, runs in res.items():
        per = statistics.median(statistics.mean(r) for _, r in runs)
        total = statistics.median(sum(r) for _, r in runs)
        wall = statistics.median(w for w, _ in runs)
        row[world] = (per, total, wall)
        print(f"{world:>10} {per:>18.1f} {total:>12.1f} {wall:>8.1f} {args.images / wall:>17.1f}")
    print(f"2 processes / 1: per process x{row[2][0] / row[1][0]:.2f}, total x{row[2][1] / row[1][1]:.2f}, "
          f"end to end x{row[1][2] / row[2][2]:.2f}")

    f1024, f256 = encoder_flops(1024), encoder_flops(256)
    print(f"\nFlux VAE encoder (FLUX_VAE, flop_counter on the meta device): {f1024 / 1e12:.3f} TFLOP per 1024^2 image; "
          f"256^2 x16 (pixels) = {16 * f256 / 1e12:.3f} TFLOP (the rest: mid-block attention over 128^2 tokens)")
    for mfu in args.mfu:
        s_per_img = f1024 / (H100_BF16_PEAK * mfu)
        gpu_h = N_IMAGES_REAL * s_per_img / 3600
        print(f"arithmetic at {mfu:.0%} MFU: {1 / s_per_img:.0f} images/s per H100, 22M images = {gpu_h:.0f} GPU-hours "
              f"({gpu_h / 64:.1f} h on 64 H100s)")


if __name__ == "__main__":
    main()
