"""python -m lumina_illus.toyworld.summary runs/toy_eval/curve.json

Print the character-recall curve written by eval/char_recall.py as a table: for each run, recall at
every checkpoint (x = image samples seen), overall and per train_samples bucket, then the first and
last checkpoint's recall of the most frequent characters side by side (the quickstart's headline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _bucket_start(label: str) -> int:
    """Lower edge of a bucket label such as '1000-2500' or '>=10000' (for sorting)."""
    digits = "".join(c if c.isdigit() else " " for c in label).split()
    return int(digits[0]) if digits else 0


def summarize(curves: dict[str, list[dict[str, Any]]]) -> str:
    """The table for a {run: [curve point, ...]} mapping (evaluation/curves.py format)."""
    lines = []
    for run, pts in curves.items():
        pts = sorted(pts, key=lambda p: (p["samples_seen"] or 0))
        if not pts:
            continue
        buckets = sorted({b for p in pts for b in p["per_bucket"]}, key=_bucket_start)
        head = f"{'step':>7} {'samples':>9} {'recall':>7}  " + "  ".join(f"{b:>10}" for b in buckets)
        lines += [f"run {run}: recall overall and by training images per character", head]
        for p in pts:
            per = "  ".join(
                f"{p['per_bucket'][b]:>10.3f}" if p["per_bucket"].get(b) is not None else f"{'-':>10}" for b in buckets
            )
            lines.append(f"{p['step']:>7} {p['samples_seen'] or 0:>9} {p['recall']:>7.3f}  {per}")
        top = buckets[-1] if buckets else None
        if top is not None and len(pts) > 1:
            first, last = pts[0]["per_bucket"].get(top), pts[-1]["per_bucket"].get(top)
            lines.append(
                f"most frequent characters ({top} training images): recall {first:.3f} at the first checkpoint "
                f"-> {last:.3f} at the last ({pts[-1]['samples_seen']} samples seen)"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("curve", type=Path, help="curve.json written by eval/char_recall.py")
    args = ap.parse_args()
    if not args.curve.is_file():
        raise SystemExit(f"{args.curve}: not found (run eval/char_recall.py first)")
    print(summarize(json.loads(args.curve.read_text())))


if __name__ == "__main__":
    main()
