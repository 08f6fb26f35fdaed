"""python eval/val_loss.py RUN_OR_CKPT [--shards 'val/shard-*.tar'] [--samples 256] [--weights raw|ema] [--out val.json]

The deterministic validation loss (lumina_illus/train/validation.py) of exported checkpoints, so
finished runs get the curve too: a run folder, its ckpt/ folder or one ckpt/step_X folder, for either
family. The run config comes from each checkpoint's metadata (its `validation:` section gives the
held-out shards, samples and t values; --shards / --samples / --t-values override). The numbers are
those the trainer logs at the same step (val/loss, val/loss_t0..9), bit for bit with fp32 exports of
an fp32 run (on CPU with the trainer's thread count per rank, --threads); prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import ConfigError, config_from_raw  # noqa: E402
from lumina_illus.evaluation import metrics as M  # noqa: E402
from lumina_illus.evaluation.checkpoints import checkpoint_info, find_checkpoints  # noqa: E402
from lumina_illus.families import get_family, read_metadata  # noqa: E402
from lumina_illus.train.validation import ValidationSet  # noqa: E402


def weights_of(step_dir: Path, family: str, ema: bool) -> Path:
    """What `model.pretrained` must name so that the family builds exactly the exported weights."""
    d = step_dir / "ema" if ema else step_dir
    if ema and not d.is_dir():
        raise FileNotFoundError(f"{step_dir}: no ema/ export (the run had EMA off?); use --weights raw")
    if family == "sdxl":
        from lumina_illus.models.sdxl import DIFFUSERS_DIR, SINGLE_FILE_NAME

        for cand in (d / DIFFUSERS_DIR, d / SINGLE_FILE_NAME):
            if cand.exists():
                return cand
        raise FileNotFoundError(f"{d}: no {DIFFUSERS_DIR}/ or {SINGLE_FILE_NAME} (an SDXL export)")
    return d  # lumina2: checkpoint_io.load_nextdit finds the layout in the folder


def evaluate_checkpoint(step_dir: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    meta = read_metadata(step_dir)
    if "config" not in meta:
        raise ValueError(f"{step_dir}: no run config in its metadata (not exported by lumina_illus)")
    raw = json.loads(json.dumps(meta["config"]))
    raw["model"]["pretrained"] = str(weights_of(step_dir, meta["family"], args.weights == "ema"))
    val = raw.setdefault("validation", {})
    val["every_steps"] = 0
    if args.shards:
        val["shards"] = args.shards
    if args.samples is not None:
        val["samples"] = args.samples
    if args.t_values:
        val["t_values"] = args.t_values
    cfg = config_from_raw(raw, where=f"{step_dir} (metadata)")
    if not cfg.validation.shards:
        raise ConfigError(f"{step_dir}: the run had no validation.shards; pass --shards")
    parts = get_family(cfg.family).build_training(cfg, device)
    result = ValidationSet(cfg, 0, 1).evaluate(parts.module, parts.prepare)
    return {**checkpoint_info(step_dir), "weights": args.weights, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="run folder, ckpt/ folder or ckpt/step_X folder")
    ap.add_argument("--shards", nargs="+", help="held-out shards (default: the run's validation.shards)")
    ap.add_argument("--samples", type=int, help="first N held-out samples (default: the run's validation.samples)")
    ap.add_argument("--t-values", type=float, nargs="+", help="Lumina t values (default: the run's)")
    ap.add_argument("--weights", choices=["raw", "ema"], default="raw",
                    help="raw (what the trainer's val/loss measures) or the EMA export")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="CPU threads (default OMP_NUM_THREADS, else 1: the trainer's ranks run 1 thread, and CPU "
                         "kernels reduce in a thread-dependent order, so only the same count gives the same bits)")
    ap.add_argument("--out", type=Path, help="JSON file of the results (default: stdout only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        ckpts = [p for p in find_checkpoints(args.path) if p.is_dir()]
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    results = []
    for step_dir in tqdm(ckpts, desc="checkpoints", disable=len(ckpts) < 2):
        try:
            results.append(evaluate_checkpoint(step_dir, args, torch.device(args.device)))
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    bins = [k for k in M.VAL_LOSS_T if any(k in r for r in results)]
    print(f"{'step':>8} {'samples':>9} {'val/loss':>10} " + " ".join(f"{k.rsplit('_', 1)[1]:>8}" for k in bins))
    for r in results:
        print(f"{r['step']:>8} {r['samples_seen'] or 0:>9} {r.get(M.VAL_LOSS, float('nan')):>10.5f} "
              + " ".join(f"{r.get(k, float('nan')):>8.4f}" for k in bins))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
