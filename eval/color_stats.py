"""python eval/color_stats.py samples/ --reference data/reference_images/ --out color_stats.json

Colour and failure statistics of a folder of images (recursive): share of exactly-white pixels, mean
saturation, colorfulness (Hasler-Suesstrunk), brightness. Flags the seed's v3.0-vpred failure modes
(white collapse: 58.46% #FFFFFF pixels; oversaturation) against a reference folder, or against absolute
levels without one. Exit status 1 when a failure mode is flagged (usable as a CI gate), 2 when a folder is
missing or holds no images (named).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.evaluation.color import STAT_KEYS, failure_flags, folder_stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder of images or generated samples")
    ap.add_argument("--reference", help="folder of reference images (e.g. training data) to compare against")
    ap.add_argument("--out", help="write the statistics and flags as JSON here")
    ap.add_argument("--per-image", action="store_true", help="keep one row per image in the JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    try:
        stats = folder_stats(args.folder, progress=not args.quiet)
        ref = folder_stats(args.reference, progress=not args.quiet) if args.reference else None
    except FileNotFoundError as e:  # names the folder: a missing one or one without images
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = failure_flags(stats, ref)
    print(f"{'':<16}{'images':>8}" + "".join(f"{k:>17}" for k in STAT_KEYS))
    for name, s in [("folder", stats), ("reference", ref)]:
        if s is not None:
            print(f"{name:<16}{s['images']:>8}" + "".join(f"{s[k]:>17.4f}" for k in STAT_KEYS))
    for flag, why in flags.items():
        print(f"FLAG {flag}: {why}")
    if not flags:
        print("no failure mode flagged")
    if args.out:
        for s in (stats, ref):
            if s is not None and not args.per_image:
                s.pop("per_image")
        Path(args.out).write_text(json.dumps({"folder": stats, "reference": ref, "flags": flags}, indent=2))
        print(f"-> {args.out}")
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main())
