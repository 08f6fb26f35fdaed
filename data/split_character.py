"""python data/split_character.py runs/toy --tag <character tag> --keep 12 --out runs/toy_newchar

Split a world's shards (<world>/shards/*.tar, as data/make_toy_world.py writes them) for a
"new character" experiment (README: LoRA, the timestep comparison):
  <out>/base/   every sample without the character: a base model trained there has never seen it
  <out>/new/    the first --keep samples with it: the few images a LoRA learns it from
  <out>/images/ the same --keep images as files (a reference folder for eval/color_stats.py)
  <out>/characters.csv   the character's row of <world>/characters.csv, train_samples = --keep
Exit status 2 when the tag is no character of the world or has fewer than --keep images.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.data.shards import ShardReadError, iter_tar, write_shards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("world", help="world folder holding shards/ and characters.csv")
    ap.add_argument("--tag", required=True, help="character tag (a `tag` of characters.csv)")
    ap.add_argument("--keep", type=int, default=12, help="images of the character the LoRA run gets")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    args = ap.parse_args()

    world, out = Path(args.world), Path(args.out)
    with open(world / "characters.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if r["tag"] == args.tag), None)
    if row is None:
        print(f"error: {args.tag!r} is not a character tag of {world / 'characters.csv'} "
              f"(e.g. {[r['tag'] for r in rows[-3:]]})", file=sys.stderr)
        sys.exit(2)
    base, new = [], []
    for shard in sorted((world / "shards").glob("*.tar")):
        for s in iter_tar(str(shard)):
            if isinstance(s, ShardReadError):
                raise s
            sample = {"__key__": s.key, **{ext: v for ext, v in s.files.items() if ext not in ("json", "txt")}}
            if "txt" in s.files:
                sample["txt"] = s.files["txt"].decode()
            meta = json.loads(s.files["json"]) if "json" in s.files else {}
            if meta:
                sample["json"] = meta
            if args.tag in (meta.get("tags") or {}).get("character", []):
                if len(new) < args.keep:
                    new.append(sample)
            else:
                base.append(sample)
    if len(new) < args.keep:
        print(f"error: {args.tag!r} has {len(new)} images in {world / 'shards'}, fewer than --keep {args.keep}",
              file=sys.stderr)
        sys.exit(2)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for s in new:
        ext = next(e for e in ("png", "jpg", "webp") if e in s)
        (images / f"{s['__key__']}.{ext}").write_bytes(s[ext])
    write_shards(base, out / "base", args.samples_per_shard, prefix="base")
    write_shards(new, out / "new", args.samples_per_shard, prefix="new")
    with open(out / "characters.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow({**row, "train_samples": args.keep})
    print(f"[split] {len(base)} base samples -> {out / 'base'}, {len(new)} of {args.tag!r} -> {out / 'new'}")


if __name__ == "__main__":
    main()
