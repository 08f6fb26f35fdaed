"""python data/annotate_colors.py DATA_DIR [--workers 8] [--edges DATA_DIR/color_quartiles.json] [--strict]

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
rewrites only jsons whose tokens change. No bad file stops the run: an image that cannot be read or
decoded, a json sidecar that is unreadable or has a field of the wrong type (lumina_illus/data/
sources.py) is refused with its path and reason and left as it is, and every other image still gets
its tokens. The refusals are printed as a table by reason and written to DATA_DIR/color_refused.json;
exit status 1 when no image has tokens, or with --strict when any file was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

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
from lumina_illus.data.decode import DecodeError, load_rgb  # noqa: E402
from lumina_illus.data.sources import (  # noqa: E402
    Refusals,
    Refused,
    has_color_stats,
    open_source,
    read_json_sidecar,
    scan_folder,
)

EDGES_FILE = "color_quartiles.json"
REFUSED_FILE = "color_refused.json"


def read_json(path: Path) -> dict:
    """The image's json sidecar ({} when there is none); raises Refused."""
    return read_json_sidecar(path) if path.is_file() else {}


def write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, ensure_ascii=False))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written json


def stats_job(image: Path) -> tuple[str, Refused | None]:
    """Pass 1 for one image; returns (path, the refusal or None)."""
    jpath = image.with_suffix(".json")
    try:
        meta = read_json(jpath)
        if has_color_stats(meta, METRICS):
            return str(image), None
        img, _, _, _ = open_source(image)
        try:
            stats = color_stats(load_rgb(img))
        except DecodeError as e:
            raise Refused(e.reason, str(e), image) from None
    except Refused as e:
        return str(image), e
    meta["color"] = stats
    meta["colorful"] = is_colorful(stats)
    write_json(jpath, meta)
    return str(image), None


def levels_job(args: tuple[Path, dict]) -> tuple[str, bool, Refused | None]:
    """Pass 2 for one image: (path, whether its json changed, the refusal or None)."""
    image, edges = args
    jpath = image.with_suffix(".json")
    try:
        meta = read_json(jpath)  # checked in pass 1; read again, it may have changed since
    except Refused as e:
        return str(image), False, e
    if not has_color_stats(meta, METRICS):
        return str(image), False, None
    tokens = control_tokens(meta["color"], edges)
    if meta.get("control") == tokens:
        return str(image), False, None
    meta["control"] = tokens
    write_json(jpath, meta)
    return str(image), True, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, help="folder of images with sidecar .json files")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    ap.add_argument("--edges", type=Path, default=None,
                    help=f"quartiles json to reuse instead of computing them (default: written to DATA_DIR/{EDGES_FILE})")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any file was refused")
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"{args.data_dir}: not a directory")
    images = scan_folder(args.data_dir).images
    if not images:
        ap.error(f"{args.data_dir}: no images")

    refusals = Refusals()
    refused: set[str] = set()
    with Pool(args.workers) as pool:
        for path, err in tqdm(pool.imap_unordered(stats_job, images, chunksize=16), total=len(images),
                              desc="color statistics"):
            if err is not None:
                refusals.add_error(err, sample=path)
                refused.add(path)
    good = [p for p in images if str(p) not in refused]

    if args.edges is not None:
        edges = json.loads(args.edges.read_text())
        missing = [metric for metric, _ in CONTROL_TOKENS.values() if metric not in edges]
        if missing:
            ap.error(f"{args.edges}: missing metrics {missing}")
    else:
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        for image in tqdm(good, desc="collect statistics"):
            try:
                meta = read_json(image.with_suffix(".json"))
            except Refused:
                continue  # changed since pass 1: pass 2 reports it
            if has_color_stats(meta, METRICS):
                for m in METRICS:
                    values[m].append(meta["color"][m])
        if not values[METRICS[0]]:
            return refusals.finish(args.data_dir / REFUSED_FILE, usable=0, strict=args.strict)
        edges = quartile_edges(values)
        write_json(args.data_dir / EDGES_FILE, edges)

    changed = tokens = 0
    with Pool(args.workers) as pool:
        for path, did, err in tqdm(pool.imap_unordered(levels_job, [(p, edges) for p in good], chunksize=64),
                                   total=len(good), desc="control tokens"):
            if err is not None:
                refusals.add_error(err, sample=path)
            else:
                changed += did
                tokens += 1
    print(f"{len(images)} images, {len(refusals.files)} refused, {changed} jsons updated with control tokens; "
          f"quartiles: {args.edges or args.data_dir / EDGES_FILE}")
    return refusals.finish(args.data_dir / REFUSED_FILE, usable=tokens, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
