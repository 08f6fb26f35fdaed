"""python data/make_shards.py SOURCE OUT_DIR [--samples-per-shard 1000] [--shuffle-seed 0] [--strict]

Webdataset shards from a folder of images with sidecar `.txt` / `.json` files (same stem), or from a
CSV / parquet index with columns `image` (path, relative to the index file), optional `caption`,
optional `json` (a JSON object as text) and optional tag columns `character`, `copyright`, `artist`,
`general`, `meta` (comma-separated tags). Writes OUT_DIR/shard-000000.tar, ... and
OUT_DIR/manifest.json (per-shard sample counts and bytes, totals, bucket histogram). JPEG, PNG and
WebP bytes are copied unchanged (stored under their real format's field, whatever the extension
says); other formats PIL reads (GIF, BMP, TIFF, ...) are converted to PNG of their first frame.
json["width"/"height"] and json["source"] are filled in. Every shard is read back and checked.

No bad file stops the run: an image whose header cannot be read, a caption that is not UTF-8, a json
sidecar that is unreadable or has a field of the wrong type, a file of a type PIL cannot read is
refused with its path and reason, and the run goes on. The refusals are printed as a table by reason
and written to OUT_DIR/refused.json ({"refused": {reason: n}, "files": [{path, reason, message}],
"converted": [...], "unused_sidecars": [...]}). Exit status 1 when no sample was written, or with
--strict when any file was refused. Problems only a full decode finds (a JPEG cut inside its scan
data) are left to the loader, which skips and counts them.
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
from lumina_illus.data.shards import MANIFEST, write_shards  # noqa: E402
from lumina_illus.data.sources import (  # noqa: E402
    REFUSED,
    Refusals,
    Refused,
    check_meta,
    read_caption,
    read_image,
    read_json_sidecar,
    scan_folder,
    sidecar,
)

TAG_COLUMNS = ("character", "copyright", "artist", "general", "meta")


def folder_records(root: Path, exclude: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """One record per file that is not a sidecar: {"image": Path, "txt": Path | None, "json": Path | None},
    and the sidecars without an image."""
    folder = scan_folder(root, exclude=exclude)
    records = [{"image": p, "txt": sidecar(p, "txt"), "json": sidecar(p, "json"), "where": str(p)} for p in folder.images]
    return records, folder.unused_sidecars


def index_records(index: Path) -> list[dict[str, Any]]:
    """Records from a CSV or parquet index (an unreadable json cell is refused with its row later);
    errors name the file, row and column."""
    if index.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(index).to_pylist()
    else:
        with open(index, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a column
            rows = list(csv.DictReader(f))
    if rows and "image" not in rows[0]:
        raise ValueError(f"{index}: missing required column 'image' (columns: {sorted(rows[0])})")
    out = []
    for i, row in enumerate(rows):
        where = f"{index} row {i + 1}"
        meta: Any = {}
        if row.get("json"):
            try:
                meta = json.loads(row["json"])
            except ValueError as e:
                meta = f"column 'json' is not valid JSON: {e}"  # refused with this row, the others go on
            if not isinstance(meta, (dict, str)):
                meta = f"column 'json' holds a {type(meta).__name__}, expected a JSON object"
        if isinstance(meta, dict):
            for c in TAG_COLUMNS:
                if row.get(c):
                    meta.setdefault("tags", {})[c] = [t.strip() for t in str(row[c]).split(",") if t.strip()]
        out.append({"image": (index.parent / str(row["image"])), "caption": row.get("caption") or None,
                    "meta": meta, "where": where})
    return out


def build_sample(r: dict[str, Any], i: int, root: Path, converted: list[dict[str, str]]) -> dict[str, Any]:
    """The shard sample of one record; raises Refused naming the file at fault."""
    img_path: Path = r["image"]
    img = read_image(img_path)
    if r.get("json"):
        meta = read_json_sidecar(r["json"])
    elif isinstance(r.get("meta"), str):  # the index row's json column was unreadable
        raise Refused("bad_json", f"{r['where']}: {r['meta']}", img_path)
    else:
        meta = dict(r.get("meta") or {})
        try:
            check_meta(meta)
        except ValueError as e:
            raise Refused("bad_json", f"{r['where']}: {e}", img_path) from None
    caption = read_caption(r["txt"]) if r.get("txt") else r.get("caption")
    if img.converted_from:
        converted.append({"path": str(img_path), "format": img.converted_from})
    meta.update(width=img.width, height=img.height,
                source=str(img_path.relative_to(root) if img_path.is_relative_to(root) else img_path))
    s: dict[str, Any] = {"__key__": f"{i:09d}", img.field: img.data, "json": meta}
    if caption:
        s["txt"] = caption
    return s


def samples(records: list[dict[str, Any]], root: Path, refusals: Refusals, converted: list) -> Iterator[dict]:
    for i, r in enumerate(tqdm(records, desc="shards")):
        try:
            yield build_sample(r, i, root, converted)
        except Refused as e:
            refusals.add_error(e, sample=r["where"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="folder of images (+ .txt/.json) or a .csv/.parquet index")
    ap.add_argument("out_dir", type=Path, help="where shards and manifest.json go")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle samples before sharding (the loader only shuffles within a buffer)")
    ap.add_argument("--max-area", type=int, default=DataConfig.max_area, help="bucket histogram: target area")
    ap.add_argument("--min-area", type=int, default=DataConfig.min_area, help="bucket histogram: smallest area")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any file was refused")
    args = ap.parse_args(argv)
    unused: list[Path] = []
    if args.source.is_dir():
        (records, unused), root = folder_records(args.source, exclude=args.out_dir), args.source
    elif args.source.suffix in (".csv", ".parquet") and args.source.is_file():
        try:
            records, root = index_records(args.source), args.source.parent
        except ValueError as e:  # the index itself is unusable (no 'image' column)
            ap.error(str(e))
    else:
        ap.error(f"{args.source}: neither a folder nor a .csv/.parquet file")
    if not records:
        ap.error(f"{args.source}: no files found")
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(records)
    refusals = Refusals()
    converted: list[dict[str, str]] = []
    bucket_cfg = DataConfig(max_area=args.max_area, min_area=args.min_area)
    manifest = write_shards(samples(records, root, refusals, converted), args.out_dir, args.samples_per_shard,
                            prefix=args.prefix, bucket_cfg=bucket_cfg)
    manifest["skipped"] = refusals.counts()
    (args.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    formats = Counter(c["format"] for c in converted)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB), "
          f"{len(refusals.files)} files refused, {len(converted)} converted to PNG "
          f"{dict(formats) if formats else ''}, verified; manifest: {args.out_dir / MANIFEST}")
    if unused:
        print(f"{len(unused)} .txt/.json files without an image of the same stem were not used "
              f"(listed in {args.out_dir / REFUSED}), e.g. {unused[0]}", file=sys.stderr)
    return refusals.finish(args.out_dir / REFUSED, usable=manifest["samples"], strict=args.strict,
                           converted=converted, unused_sidecars=[str(p) for p in unused])


if __name__ == "__main__":
    sys.exit(main())
