"""python bench/compile_step.py [--repeats 5] [--packs 6] [--activation-checkpointing off]

Per-block torch.compile (`model.compile: true`, NextDiT.compile_blocks: inductor, dynamic shapes)
against eager, side by side in one process, same weights: forward + backward of a mean-square loss
over `--packs` packed micro-batches of different sizes (2-6 images of 8..32 latent px per side,
captions of 10..80 tokens), the same packs for both. A warm-up round compiles (its time is printed);
then rounds alternate eager and compiled pack by pack. Also prints how many graphs dynamo compiled
before and after the timed rounds (no recompiles once warm, though every pack has a new size).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from model_step import _cpu_name, small_config  # bench/model_step.py
from torch._dynamo.utils import counters

from lumina_illus.models.nextdit import NextDiT


def make_packs(cfg, n: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    packs = []
    for _ in range(n):
        b = int(torch.randint(2, 7, (1,), generator=g))
        sizes = (torch.randint(2, 9, (b, 2), generator=g) * 4).tolist()
        cap = torch.randint(10, 80, (b,), generator=g)
        latents = [torch.randn(cfg.in_channels, h, w, generator=g) for h, w in sizes]
        feats = torch.randn(b, int(cap.max()), cfg.cap_feat_dim, generator=g)
        packs.append((latents, torch.rand(b, generator=g), feats, torch.arange(int(cap.max()))[None] < cap[:, None]))
    return packs


def step(model: NextDiT, pack: tuple) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(*pack)
    sum(o.square().mean() for o in out).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all packs")
    ap.add_argument("--packs", type=int, default=6, help="micro-batches of different sizes per round")
    ap.add_argument("--activation-checkpointing", default="off", help="setting for both models (off, full, 0.5, ...)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = small_config("sdpa")
    eager = NextDiT(cfg)
    with torch.no_grad():  # the published init zeroes adaLN and the output: random weights instead
        for p in eager.parameters():
            p.normal_(0.0, 0.05)
    ac = args.activation_checkpointing
    eager.set_activation_checkpointing(float(ac) if ac.replace(".", "", 1).isdigit() else ac)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    packs = make_packs(cfg, args.packs)

    t0 = time.perf_counter()
    for pack in packs:
        step(compiled, pack)
    warm = time.perf_counter() - t0
    graphs_warm = counters["stats"]["unique_graphs"]
    rounds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        tot = {"eager": 0.0, "compiled": 0.0}
        for pack in packs:
            tot["eager"] += step(eager, pack)
            tot["compiled"] += step(compiled, pack)
        for k, v in tot.items():
            rounds[k].append(v / len(packs))
    e, c = statistics.median(rounds["eager"]), statistics.median(rounds["compiled"])
    tokens = [sum(x.shape[1] * x.shape[2] // 4 for x in p[0]) + int(p[3].sum()) for p in packs]
    print(f"{_cpu_name()}, torch {torch.__version__}, fp32; NextDiT dim 256, 4 layers + 2 refiners; "
          f"{len(packs)} packs of {min(tokens)}..{max(tokens)} tokens; activation checkpointing {ac}")
    print(f"compile (first round, {len(packs)} packs): {warm:.1f} s; graphs compiled: {graphs_warm} after warm-up, "
          f"{counters['stats']['unique_graphs']} after {args.repeats} more rounds")
    print("| model | ms/step (median of rounds, mean over packs) | vs eager |")
    print("|---|---|---|")
    print(f"| eager | {e * 1e3:.0f} | 1.00x |")
    print(f"| compiled blocks | {c * 1e3:.0f} | {c / e:.2f}x |")


if __name__ == "__main__":
    main()
