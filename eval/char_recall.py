"""python eval/char_recall.py runs/lu2b/ckpt --characters characters.csv --tagger wd-swinv2-tagger-v3

Character recall of one or many exported checkpoints (family detected from each checkpoint).

CKPT is an exported file, a ckpt/step_X folder, a ckpt folder or a run folder; several CKPT arguments
(or --compare) put several runs on one curve, x = image samples seen (--x flops | hours: also against
training compute or wall-clock, so "faster" has a stated meaning). Writes, under --out:
  <run>/<checkpoint>.json   per character hits/n and mean probability, recall + Wilson 95% interval,
                            recall (and colour statistics) per size and per train_samples bucket
  curve.json, curve.png     recall vs samples seen, one line per run (curve_flops.png / curve_hours.png with --x)
  report.html               self-contained page: curves by training-images bucket, and per character one
                            of its training images (--examples) beside what the first, middle and last
                            checkpoint of each run drew
  cache/                    generated images keyed by (checkpoint, prompt, size, seed, steps, guidance):
                            a re-run generates only what is new
and logs the curve to W&B (offline by default). The characters file is a CSV `name,tag,prompt,train_samples`;
--characters and --tagger default to eval.characters / eval.tagger of the checkpoint's run config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from lumina_illus.evaluation.char_recall import (  # noqa: E402
    DEFAULT_SEEDS,
    DEFAULT_SIZES,
    DEFAULT_TEMPLATES,
    DEFAULT_THRESHOLD,
    evaluate,
    format_table,
    parse_sizes,
)
from lumina_illus.evaluation.characters import load_characters  # noqa: E402
from lumina_illus.evaluation.checkpoints import checkpoint_info, find_checkpoints  # noqa: E402
from lumina_illus.evaluation.curves import curve_point, log_curves_wandb, write_curves  # noqa: E402
from lumina_illus.evaluation.image_cache import ImageCache, checkpoint_id, image_key  # noqa: E402
from lumina_illus.evaluation.report import write_report  # noqa: E402
from lumina_illus.evaluation.stats import DEFAULT_BUCKET_EDGES  # noqa: E402
from lumina_illus.evaluation.tagger import WDTagger  # noqa: E402
from lumina_illus.families import check_sizes, detect_family, read_metadata  # noqa: E402


class LazyGenerator:
    """Loads the checkpoint's generator on the first generate() call, so a fully cached checkpoint
    costs no model load at all."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device, self._gen = path, device, None

    def generate(self, *args: Any, **kwargs: Any) -> list:
        if self._gen is None:
            self._gen = detect_family(self.path).load_generator(self.path, self.device)
        return self._gen.generate(*args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="+", help="exported file, ckpt/step_X folder, ckpt folder or run folder")
    ap.add_argument("--compare", nargs="+", default=[], help="more runs to put on the same curve")
    ap.add_argument("--x", choices=["samples", "flops", "hours"], default="samples",
                    help="also plot recall against training compute (model FLOPs) or wall-clock hours of "
                         "optimizer steps, from each checkpoint's metadata (curve_<x>.png)")
    ap.add_argument("--characters", help="CSV name,tag,prompt,train_samples (default: eval.characters of the run)")
    ap.add_argument("--tagger", help="WD tagger folder: model.onnx + selected_tags.csv (default: eval.tagger)")
    ap.add_argument("--out", help="output folder (default: <run>/eval/char_recall, else ./char_recall)")
    ap.add_argument("--cache", help="image cache folder (default: <out>/cache)")
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in DEFAULT_SIZES), help="WxH,WxH,...")
    ap.add_argument("--per-size", action="store_true",
                    help="also plot one line per size (curve_sizes.png): recall at sizes and aspect ratios outside "
                         "the training range; per-size colour statistics are always in the JSON")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    ap.add_argument("--templates", help="text file, one prompt template per line, each with {prompt}")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the family's)")
    ap.add_argument("--guidance", type=float, help="CFG scale (default: the family's)")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="character tag probability for a hit")
    ap.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKET_EDGES)),
                    help="train_samples bucket edges, increasing, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-characters", type=int, help="evaluate only the first N characters")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tagger CPU threads")
    ap.add_argument("--wandb", choices=["offline", "online", "disabled"], default="offline")
    ap.add_argument("--wandb-project", default="lumina_illus")
    ap.add_argument("--examples", help="folder of one training image per character, <tag>.png|jpg|webp, for the "
                    "report (default: examples/ beside the characters file, when there)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _from_run_config(ckpt: Path, key: str) -> str | None:
    return ((read_metadata(ckpt).get("config") or {}).get("eval") or {}).get(key)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = parse_args(argv)
    groups = [find_checkpoints(p) for p in [*args.ckpt, *args.compare]]
    first = groups[0][0]
    characters_path = args.characters or _from_run_config(first, "characters")
    tagger_path = args.tagger or _from_run_config(first, "tagger")
    if not characters_path or not tagger_path:
        sys.exit(f"{first}: pass --characters and --tagger (the run config has no eval.characters/eval.tagger)")
    characters = load_characters(characters_path)[: args.max_characters]
    tagger = WDTagger(tagger_path, threads=args.threads)
    templates = DEFAULT_TEMPLATES
    if args.templates:
        templates = tuple(t for t in Path(args.templates).read_text().splitlines() if t.strip())
    sizes = parse_sizes(args.sizes)
    for ckpts in groups:  # before any model loads: sizes the family cannot generate stop here
        fam = detect_family(ckpts[0])
        try:
            check_sizes(sizes, fam.size_multiple, f"--sizes ({fam.name}, {ckpts[0]})")
        except ValueError as e:
            sys.exit(f"error: {e}")
    seeds = [int(s) for s in args.seeds.split(",")]
    buckets = [int(b) for b in args.buckets.split(",")]
    if args.out:
        out = Path(args.out)
    elif first.is_dir() and first.parent.name == "ckpt":
        out = first.parent.parent / "eval" / "char_recall"
    else:
        out = Path("char_recall")
    cache = ImageCache(args.cache or out / "cache")
    device = torch.device(args.device)

    curves: dict[str, list[dict[str, Any]]] = {}
    evaluations: dict[str, list[tuple[dict[str, Any], dict[str, Any], str]]] = {}
    for gi, ckpts in enumerate(groups):
        label = checkpoint_info(ckpts[0])["run"]
        if label in curves:
            label = f"{label}#{gi}"
        curves[label], evaluations[label] = [], []
        for ckpt in ckpts:
            info = checkpoint_info(ckpt)
            print(f"\n== {label} {ckpt} (step {info['step']}, samples seen {info['samples_seen']})")
            result = evaluate(
                LazyGenerator(ckpt, device), characters, tagger, sizes=sizes, seeds=seeds, templates=templates,
                steps=args.steps, guidance=args.guidance, negative_prompt=args.negative,
                threshold=args.threshold, batch_size=args.batch_size, cache=cache,
                ckpt_id=checkpoint_id(ckpt), bucket_edges=buckets, progress=not args.quiet,
            )
            result.update(checkpoint=info)
            dest = out / label / f"{ckpt.stem if ckpt.is_file() else ckpt.name}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(result, indent=2))
            print(format_table(result))
            print(f"({result['images']['generated']} generated, {result['images']['cached']} from cache) -> {dest}")
            curves[label].append(curve_point(info, result))
            evaluations[label].append((info, result, checkpoint_id(ckpt)))
    js, png = write_curves(curves, out, x=args.x, per_size=args.per_size)
    print(f"\ncurve -> {js}, {png}")

    def shown(ckpt_id: str, c: Any) -> Any:  # the report's picture: first template, size and seed
        w, h = sizes[0]
        prompt = templates[0].format(prompt=c.prompt)
        return cache.get(image_key(ckpt_id, prompt, args.negative, (int(w), int(h)), seeds[0], args.steps, args.guidance))

    examples = args.examples or (Path(characters_path).parent / "examples")
    report = write_report(out, curves, evaluations, characters, shown,
                          examples=examples if Path(examples).is_dir() else None)
    print(f"report -> {report}")
    if args.wandb != "disabled":
        log_curves_wandb(curves, png, args.wandb_project, args.wandb, out)
    return curves


if __name__ == "__main__":
    main()
