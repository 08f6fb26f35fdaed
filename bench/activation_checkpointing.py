"""python bench/activation_checkpointing.py [--repeats 5] [--threads 1]

Activation checkpointing settings (`train.activation_checkpointing`) side by side in one process, on
the same weights and the same packed mixed-resolution micro-batch: forward + backward time and the
bytes of activations kept for backward (lumina_illus.models.activation_memory.SavedActivations:
what autograd saves, distinct storages, weights excluded, plus the inputs checkpointed blocks hold).
Settings run round-robin, one step each per round, to share machine noise; ratios are against "off".
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from model_step import _cpu_name, small_config  # bench/model_step.py

from lumina_illus.models.activation_memory import SavedActivations
from lumina_illus.models.nextdit import NextDiT, NextDiTConfig

SETTINGS = ["off", 0.25, 0.5, "every_2", "full"]
MiB = 1024**2


def bench_config() -> NextDiTConfig:
    """bench/model_step.py's small model with 6 main layers: 8 blocks (context + noise refiner, 6 main)."""
    return dataclasses.replace(small_config("sdpa"), n_layers=6)


def make_work(cfg: NextDiTConfig) -> tuple:
    """6 images, latent sizes 16x16 .. 32x16 (1024 image tokens), captions of 20..80 tokens."""
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 16), (24, 16), (16, 24), (32, 16), (16, 32), (24, 24)]
    cap_lens = torch.randint(20, 80, (len(sizes),), generator=g)
    latents = [torch.randn(cfg.in_channels, h, w, generator=g) for h, w in sizes]
    feats = torch.randn(len(sizes), int(cap_lens.max()), cfg.cap_feat_dim, generator=g)
    mask = torch.arange(int(cap_lens.max()))[None] < cap_lens[:, None]
    return latents, torch.rand(len(sizes), generator=g), feats, mask


def step(model: NextDiT, work: tuple) -> tuple[float, int]:
    """(seconds, saved bytes) of one forward + backward of a mean-square loss."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with SavedActivations(model) as saved:
        out = model(*work)
    sum(o.square().mean() for o in out).backward()
    return time.perf_counter() - t0, saved.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = bench_config()
    model = NextDiT(cfg)
    with torch.no_grad():  # the published init zeroes adaLN and the output: random weights instead
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    work = make_work(cfg)
    times: dict[str, list[float]] = {str(s): [] for s in SETTINGS}
    saved: dict[str, int] = {}
    for r in range(args.repeats + 1):
        for s in SETTINGS:
            model.set_activation_checkpointing(s)
            sec, nbytes = step(model, work)
            saved[str(s)] = nbytes
            if r > 0:
                times[str(s)].append(sec)

    n_img = sum(x.shape[1] * x.shape[2] // 4 for x in work[0])
    print(f"{_cpu_name()}, torch {torch.__version__}, fp32; NextDiT dim 256, "
          f"8 blocks; {len(work[0])} images, {n_img} image + {int(work[3].sum())} caption tokens; "
          f"median of {args.repeats}")
    print("| setting | blocks recomputed | ms/step | vs off | saved activations, MiB | vs off |")
    print("|---|---|---|---|---|---|")
    base_t, base_b = statistics.median(times["off"]), saved["off"]
    for s in SETTINGS:
        model.set_activation_checkpointing(s)
        k = sum(b.recompute for b in model.blocks())
        t = statistics.median(times[str(s)])
        print(f"| {s} | {k}/{len(model.blocks())} | {t * 1e3:.0f} | {t / base_t:.2f}x | {saved[str(s)] / MiB:.1f} | "
              f"{saved[str(s)] / base_b:.2f}x |")


if __name__ == "__main__":
    main()
