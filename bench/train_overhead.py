"""python bench/train_overhead.py [--steps 30] [--out /tmp/train_overhead]

Trainer overhead on CPU, measured side by side in one process on the same batches: the full training
loop (lumina_illus.train: DeepSpeed ZeRO-2 engine, LR schedule, EMA, stats gather, telemetry; one
rank; wall clock between consecutive log records) against a bare loop over the same micro-batches
held in memory: family prepare + module forward + backward, then also clip + fused AdamW + zero_grad. Both use the tiny world of lumina_illus.train.tiny_run
with token packing (32 images of 64x64 per micro-batch). Prints per-step medians and the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def bare_step_times(cfg, steps: int) -> tuple[list[float], list[float]]:
    """Per step: (prepare + forward + backward) and that plus clip + fused AdamW + zero_grad, on
    pre-loaded batches, without DeepSpeed or the trainer."""
    import torch
    from tqdm import tqdm

    from lumina_illus.data.loader import build_loader
    from lumina_illus.families import get_family

    parts = get_family(cfg.family).build_training(cfg, torch.device("cpu"))
    loader = build_loader(cfg.data, micro_batch=cfg.train.micro_batch, rank=0, world_size=1, seed=cfg.run.seed)
    it = iter(loader)
    batches = [next(it) for _ in range(steps * cfg.train.grad_accum)]  # the same batches the trainer sees
    opt = torch.optim.AdamW([p for g in parts.param_groups for p in g["params"]], lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=True)
    gen = torch.Generator().manual_seed(0)
    fwd_bwd, total = [], []
    for s in tqdm(range(steps), desc="bare loop"):
        t0 = time.perf_counter()
        for m in range(cfg.train.grad_accum):
            out = parts.module(**parts.prepare(batches[s * cfg.train.grad_accum + m], gen))
            (out.loss / cfg.train.grad_accum).backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parts.module.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fwd_bwd.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return fwd_bwd, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per loop (first 3 not timed)")
    ap.add_argument("--out", default="/tmp/train_overhead", help="folder for the tiny world and the run")
    args = ap.parse_args()

    import torch

    from lumina_illus.config import load_config
    from lumina_illus.train import train
    from lumina_illus.train.tiny_run import make_tiny_run

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg_path = make_tiny_run(Path(args.out), images=256)
    overrides = [
        "run.name=overhead", f"train.max_steps={args.steps}", "train.global_batch=32", "train.micro_batch=32",
        "train.grad_accum=1", "data.batching=tokens", "data.token_budget=512", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0", "checkpoint.resume=none", "telemetry.wandb_mode=disabled", "ema.decay=0.99",
    ]
    cfg = load_config(cfg_path, overrides)
    run_dir = cfg.run_dir
    if (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()
    torch.manual_seed(0)
    fwd_bwd, bare_opt = (x[3:] for x in bare_step_times(cfg, args.steps))
    torch.manual_seed(0)
    # the trainer writes a final export at max_steps; step times in log.jsonl exclude checkpoints
    train(cfg)
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    # wall clock between consecutive step records: everything the loop does per step, logging included
    stamps = [r["time"] for r in recs if "event" not in r]
    full = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    wait = [r["perf/data_wait_frac"] for r in recs if "event" not in r][3:]
    full = full[: len(wait)]
    b, o, f = statistics.median(fwd_bwd), statistics.median(bare_opt), statistics.median(full)
    print(f"steps timed: {len(full)} (after 3 warm-up), 32 images of 64x64 per step, 1 CPU rank, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"bare prepare+fwd+bwd              median {b * 1e3:7.1f} ms/step")
    print(f"bare prepare+fwd+bwd+clip+AdamW   median {o * 1e3:7.1f} ms/step")
    print(f"full trainer loop (wall clock)    median {f * 1e3:7.1f} ms/step   (data wait {statistics.median(wait):.1%})")
    print(f"trainer overhead vs fwd+bwd       {100 * (f - b) / b:+.1f} %   (target < 10 %)")
    print(f"trainer overhead vs fwd+bwd+AdamW {100 * (f - o) / o:+.1f} %")
    # data.num_workers=0 here: decoding runs in the training process, on the clock of the full loop
    fx = statistics.median(t * (1 - w) for t, w in zip(full, wait))
    print(f"same, data loading excluded       {100 * (fx - b) / b:+.1f} % vs fwd+bwd, {100 * (fx - o) / o:+.1f} % vs fwd+bwd+AdamW")

if __name__ == "__main__":
    main()
