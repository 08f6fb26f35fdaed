"""python bench/packing.py [--samples 200000] [--configs configs/lu2b_768.yaml configs/lu2b_arbitrary.yaml]

Token packing on a realistic size distribution, through the trainer's own bucketing
(lumina_illus.data.buckets.assign_bucket) and packer (lumina_illus.data.packing.TokenPacker) with each
config's data settings: how full the micro-batches are (token efficiency = image tokens / token budget)
and how many samples an optimizer step holds (micro-batches of grad_accum x world ranks) against the
config's train.global_batch, which with packing is a cap in samples, not the batch.

Sizes: danbooru-like originals drawn with a fixed seed: area log-uniform between 512x512 and 3072x3072
pixels (phone screenshots to large commissions), aspect h/w log-normal around 1.3 (portrait-leaning,
sigma 0.35), clipped to the data.skip_aspect the loader enforces; images below data.min_side are
skipped as the loader does. Samples arrive in random order, as from the shuffle buffer.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import load_config  # noqa: E402
from lumina_illus.data.buckets import assign_bucket, image_tokens  # noqa: E402
from lumina_illus.data.packing import TokenPacker  # noqa: E402


def danbooru_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(h, w) of `n` originals (see module docstring)."""
    rng = np.random.default_rng(seed)
    area = np.exp(rng.uniform(math.log(512**2), math.log(3072**2), n))
    aspect = np.exp(rng.normal(math.log(1.3), 0.35, n))  # h / w
    h = np.sqrt(area * aspect)
    w = area / h
    return [(max(1, int(a)), max(1, int(b))) for a, b in zip(h, w)]


def measure(config: str, sizes: list[tuple[int, int]], world: int) -> dict[str, float]:
    cfg = load_config(config, [])
    d, t = cfg.data, cfg.train
    tokens = []
    for h, w in sizes:
        if min(h, w) < d.min_side or max(h / w, w / h) > d.skip_aspect:
            continue
        tokens.append(image_tokens(d, assign_bucket(d, h, w)))
    packer: TokenPacker[int] = TokenPacker(d.token_budget, t.micro_batch, d.pack_lookahead)
    micro = []
    for tok in tokens:
        out = packer.add(tok, tok)
        if out:
            micro.append(out)
    per_step = t.grad_accum * world
    steps = [micro[i : i + per_step] for i in range(0, len(micro) - per_step + 1, per_step)]
    samples = [sum(len(m) for m in s) for s in steps]
    step_tokens = [sum(sum(m) for m in s) for s in steps]
    return {
        "config": config, "world": world, "token_budget": d.token_budget, "micro_batch_cap": t.micro_batch,
        "lookahead": d.pack_lookahead,
        "global_batch_cap": t.global_batch, "images": len(tokens),
        "mean_image_tokens": statistics.fmean(tokens),
        "efficiency": sum(sum(m) for m in micro) / (len(micro) * d.token_budget),
        "samples_per_micro": statistics.fmean(len(m) for m in micro),
        "micro_at_cap": sum(len(m) == t.micro_batch for m in micro) / len(micro),
        "step_samples_mean": statistics.fmean(samples), "step_samples_min": min(samples),
        "step_samples_max": max(samples), "step_tokens_mean": statistics.fmean(step_tokens),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000, help="originals drawn")
    ap.add_argument("--configs", nargs="+", default=["configs/lu2b_768.yaml", "configs/lu2b_arbitrary.yaml"])
    ap.add_argument("--world", type=int, default=32, help="GPUs (the configs' 4 nodes x 8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = danbooru_sizes(args.samples, args.seed)
    rows = [measure(c, sizes, args.world) for c in args.configs]
    print(f"{args.samples} danbooru-like originals, {args.world} GPUs")
    print(f"{'config':<30} {'budget':>7} {'cap':>4} {'efficiency':>10} {'samples/micro':>13} {'at cap':>7} "
          f"{'step samples mean/min/max':>26} {'step tokens':>12} {'vs global_batch':>15}")
    for r in rows:
        print(f"{Path(r['config']).name:<30} {r['token_budget']:>7} {r['micro_batch_cap']:>4} {r['efficiency']:>10.3f} "
              f"{r['samples_per_micro']:>13.2f} {r['micro_at_cap']:>7.1%} "
              f"{r['step_samples_mean']:>12.1f} / {r['step_samples_min']:>4} / {r['step_samples_max']:>4} "
              f"{r['step_tokens_mean']:>12.0f} {r['step_samples_mean'] / r['global_batch_cap']:>15.2f}")
    return rows


if __name__ == "__main__":
    main()
