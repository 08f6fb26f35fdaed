"""python data/make_shards.py SOURCE OUT_DIR [--samples-per-shard 1000] [--shuffle-seed 0]

Webdataset shards from a folder of images with sidecar `.txt` / `.json` files (same stem), or from a
CSV / parquet index with columns `image` (path, relative to the index file), optional `caption`,
optional `json` (a JSON object as text) and optional tag columns `character`, `copyright`, `artist`,
`general`, `meta` (comma-separated tags). Writes OUT_DIR/shard-000000.tar, ... and
OUT_DIR/manifest.json (per-shard sample counts and bytes, totals, bucket histogram). Image bytes
are copied unchanged; json["width"/"height"] and json["source"] are filled in. Every shard is read
back and checked after writing; images whose header cannot be read are reported and left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import DataConfig  # noqa: E402
from lumina_illus.data.decode import DecodeError, open_image  # noqa: E402
from lumina_illus.data.shards import IMAGE_EXTS, MANIFEST, write_shards  # noqa: E402

TAG_COLUMNS = ("character", "copyright", "artist", "general", "meta")


def folder_records(root: Path) -> list[dict[str, Any]]:
    """One record per image: {"image": Path, "txt": Path | None, "json": Path | None}."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower()[1:] in IMAGE_EXTS:
            txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
            out.append({"image": p, "txt": txt if txt.is_file() else None, "json": js if js.is_file() else None,
                        "where": str(p)})
    return out


def index_records(index: Path) -> list[dict[str, Any]]:
    """Records from a CSV or parquet index; errors name the file, row and column."""
    if index.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(index).to_pylist()
    else:
        with open(index, newline="") as f:
            rows = list(csv.DictReader(f))
    if rows and "image" not in rows[0]:
        raise ValueError(f"{index}: missing required column 'image' (columns: {sorted(rows[0])})")
    out = []
    for i, row in enumerate(rows):
        where = f"{index} row {i + 1}"
        meta: dict[str, Any] = {}
        if row.get("json"):
            try:
                meta = json.loads(row["json"])
            except ValueError as e:
                raise ValueError(f"{where}: column 'json' is not valid JSON: {e}") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: column 'json' must hold a JSON object")
        for c in TAG_COLUMNS:
            if row.get(c):
                meta.setdefault("tags", {})[c] = [t.strip() for t in str(row[c]).split(",") if t.strip()]
        out.append({"image": (index.parent / str(row["image"])), "caption": row.get("caption") or None,
                    "meta": meta, "where": where})
    return out


def samples(records: list[dict[str, Any]], root: Path, skipped: Counter, report: list[str]) -> Iterator[dict]:
    for i, r in enumerate(tqdm(records, desc="shards")):
        img_path: Path = r["image"]
        ext = img_path.suffix.lower()[1:]
        if ext not in IMAGE_EXTS:
            skipped["not_an_image"] += 1
            report.append(f"{r['where']}: {img_path} is not jpg/png/webp")
            continue
        try:
            data = img_path.read_bytes()
            _, h, w = open_image(data)
        except (OSError, DecodeError) as e:
            skipped["unreadable_image"] += 1
            report.append(f"{r['where']}: {e}")
            continue
        meta = dict(r.get("meta") or {})
        if r.get("json"):
            try:
                meta = json.loads(r["json"].read_text())
            except ValueError as e:
                skipped["bad_json"] += 1
                report.append(f"{r['json']}: unreadable json: {e}")
                continue
            if not isinstance(meta, dict):
                skipped["bad_json"] += 1
                report.append(f"{r['json']}: json is not an object")
                continue
        meta.update(width=w, height=h, source=str(img_path.relative_to(root) if img_path.is_relative_to(root)
                                                     else img_path))
        s: dict[str, Any] = {"__key__": f"{i:09d}", ext: data, "json": meta}
        caption = r["txt"].read_text() if r.get("txt") else r.get("caption")
        if caption:
            s["txt"] = caption
        yield s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="folder of images (+ .txt/.json) or a .csv/.parquet index")
    ap.add_argument("out_dir", type=Path, help="where shards and manifest.json go")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle samples before sharding (the loader only shuffles within a buffer)")
    ap.add_argument("--max-area", type=int, default=DataConfig.max_area, help="bucket histogram: target area")
    ap.add_argument("--min-area", type=int, default=DataConfig.min_area, help="bucket histogram: smallest area")
    args = ap.parse_args(argv)
    if args.source.is_dir():
        records, root = folder_records(args.source), args.source
    elif args.source.suffix in (".csv", ".parquet") and args.source.is_file():
        records, root = index_records(args.source), args.source.parent
    else:
        ap.error(f"{args.source}: neither a folder nor a .csv/.parquet file")
    if not records:
        ap.error(f"{args.source}: no images found")
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(records)
    skipped: Counter[str] = Counter()
    report: list[str] = []
    bucket_cfg = DataConfig(max_area=args.max_area, min_area=args.min_area)
    manifest = write_shards(samples(records, root, skipped, report), args.out_dir, args.samples_per_shard,
                            prefix=args.prefix, bucket_cfg=bucket_cfg)
    manifest["skipped"] = dict(skipped)
    (args.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for line in report:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB), "
          f"{sum(skipped.values())} skipped, verified; manifest: {args.out_dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
