"""python data/annotate_colors.py DATA_DIR [--workers 8] [--edges DATA_DIR/color_quartiles.json]

Colour statistics and control tokens for a folder of images with sidecar `.json` files (the input
of data/make_shards.py). Two passes, both resumable and multi-process with a progress bar:

1. statistics: for every image whose json has no complete "color" entry yet, compute contrast,
   brightness, sharpness (Laplacian variance), dynamic range, colourfulness (Hasler-Suesstrunk),
   saturation mean and std (lumina_illus/data/control.py) and write them to json["color"];
   json["colorful"] applies the report's rule (saturation > 120 and saturation std < 50).
2. levels: quartiles of each metric over the dataset (or read from --edges, to label new data
   the same way as old) are saved to DATA_DIR/color_quartiles.json, and each json gets
   json["control"] = {"contrast": "high contrast", ..., "saturation": "muted colors"},
   the tokens the caption builder inserts.

An interrupted run restarts where it stopped: pass 1 skips images that have statistics, pass 2
rewrites only jsons whose tokens change. Unreadable images are reported and left without tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.data.control import (  # noqa: E402
    CONTROL_TOKENS,
    METRICS,
    color_stats,
    control_tokens,
    is_colorful,
    quartile_edges,
)
from lumina_illus.data.decode import DecodeError, load_rgb, open_image  # noqa: E402
from lumina_illus.data.shards import IMAGE_EXTS  # noqa: E402

EDGES_FILE = "color_quartiles.json"


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower()[1:] in IMAGE_EXTS)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable json: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: json is not an object")
    return d


def write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, ensure_ascii=False))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written json


def stats_job(image: Path) -> tuple[str, str | None]:
    """Pass 1 for one image; returns (path, error or None)."""
    jpath = image.with_suffix(".json")
    try:
        meta = read_json(jpath)
        if isinstance(meta.get("color"), dict) and all(m in meta["color"] for m in METRICS):
            return str(image), None
        img, _, _ = open_image(image.read_bytes())
        stats = color_stats(load_rgb(img))
    except (ValueError, DecodeError, OSError) as e:
        return str(image), str(e)
    meta["color"] = stats
    meta["colorful"] = is_colorful(stats)
    write_json(jpath, meta)
    return str(image), None


def levels_job(args: tuple[Path, dict]) -> bool:
    """Pass 2 for one image; True when its json changed."""
    image, edges = args
    jpath = image.with_suffix(".json")
    meta = read_json(jpath)
    if not isinstance(meta.get("color"), dict):
        return False
    tokens = control_tokens(meta["color"], edges)
    if meta.get("control") == tokens:
        return False
    meta["control"] = tokens
    write_json(jpath, meta)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, help="folder of images with sidecar .json files")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    ap.add_argument("--edges", type=Path, default=None,
                    help=f"quartiles json to reuse instead of computing them (default: written to DATA_DIR/{EDGES_FILE})")
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"{args.data_dir}: not a directory")
    images = find_images(args.data_dir)
    if not images:
        ap.error(f"{args.data_dir}: no images ({', '.join(IMAGE_EXTS)})")
    Image.MAX_IMAGE_PIXELS = None  # large illustrations are legitimate here; statistics run on a thumbnail

    errors = []
    with Pool(args.workers) as pool:
        for path, err in tqdm(pool.imap_unordered(stats_job, images, chunksize=16), total=len(images),
                              desc="color statistics"):
            if err:
                errors.append((path, err))
    for path, err in errors:
        print(f"skipped {path}: {err}", file=sys.stderr)

    if args.edges is not None:
        edges = json.loads(args.edges.read_text())
        missing = [metric for metric, _ in CONTROL_TOKENS.values() if metric not in edges]
        if missing:
            ap.error(f"{args.edges}: missing metrics {missing}")
    else:
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        for image in tqdm(images, desc="collect statistics"):
            color = read_json(image.with_suffix(".json")).get("color")
            if isinstance(color, dict):
                for m in METRICS:
                    values[m].append(color[m])
        edges = quartile_edges(values)
        write_json(args.data_dir / EDGES_FILE, edges)

    with Pool(args.workers) as pool:
        changed = sum(tqdm(pool.imap_unordered(levels_job, [(p, edges) for p in images], chunksize=64),
                           total=len(images), desc="control tokens"))
    print(f"{len(images)} images, {len(errors)} unreadable, {changed} jsons updated with control tokens; "
          f"quartiles: {args.edges or args.data_dir / EDGES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
