"""python data/annotate_colors.py DATA_DIR [--workers 8] [--edges DATA_DIR/color_quartiles.json] [--wait-timeout 1800] [--strict]

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

Under a launcher (torchrun, deepspeed, srun, mpirun: lumina_illus/dist_env.py) each rank computes
pass 1 for its share of the images (every world_size-th of the sorted list, from its rank; --workers
processes each, default: the cores of the node shared by its ranks), then writes a marker
DATA_DIR/.color_pass1/rankR-of-W.json holding a digest of the image list and its refusals. Rank 0
waits for every rank's marker (a file barrier, module docstring of dist_env: the data folder is shared
by the ranks anyway, it needs no process group, ports or rendezvous, ranks may start at different
times, and a dead rank ends the wait after --wait-timeout seconds with the ranks named), checks that
every image it did not see refused has statistics, computes the quartiles over the whole dataset and
runs pass 2 alone. The result equals a one-process run's (the same statistics, quartiles and tokens
in every json; refusals merged into one report).

    torchrun --nproc-per-node 4 data/annotate_colors.py DATA_DIR --workers 4
    srun --ntasks 16 python data/annotate_colors.py DATA_DIR

An interrupted run restarts where it stopped: pass 1 skips images that have statistics, pass 2
rewrites only jsons whose tokens change. No bad file stops the run: an image that cannot be read or
decoded, a json sidecar that is unreadable or has a field of the wrong type (lumina_illus/data/
sources.py) is refused with its path and reason and left as it is, and every other image still gets
its tokens. The refusals are printed as a table by reason and written to DATA_DIR/color_refused.json;
exit status 1 when no image has tokens, or with --strict when any file was refused; 2 when rank 0 timed
out waiting for a rank or found images without statistics that no rank refused.
"""

from __future__ import annotations

import argparse
import hashlib
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
from lumina_illus.dist_env import LaunchEnv, launch_env, wait_for  # noqa: E402

EDGES_FILE = "color_quartiles.json"
REFUSED_FILE = "color_refused.json"
PASS1_DIR = ".color_pass1"  # one marker per rank: its share of pass 1 is done


def read_json(path: Path) -> dict:
    """The image's json sidecar ({} when there is none); raises Refused."""
    return read_json_sidecar(path) if path.is_file() else {}


def write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".json.tmp")  # sources.scan_folder does not list it as an image
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


def pass1_marker(data_dir: Path, rank: int, world_size: int) -> Path:
    return data_dir / PASS1_DIR / f"rank{rank:05d}-of-{world_size:05d}.json"


def list_digest(data_dir: Path, images: list[Path]) -> str:
    """Every rank must split the same image list: the markers carry this digest of it."""
    return hashlib.sha256("\n".join(str(p.relative_to(data_dir)) for p in images).encode()).hexdigest()


def wait_for_ranks(data_dir: Path, env: LaunchEnv, digest: str, timeout: float) -> list[dict]:
    """Rank 0: every rank's pass-1 marker for this image list (the file barrier); returns them by rank."""
    markers: dict[int, dict] = {}
    bar = tqdm(total=env.world_size, desc="all ranks (pass 1)")

    def missing() -> list[str]:
        for r in range(env.world_size):
            path = pass1_marker(data_dir, r, env.world_size)
            if r not in markers and path.is_file():
                m = json.loads(path.read_text())
                if m["images"] == digest:  # else a marker of an earlier run over another image list
                    markers[r] = m
        return [f"rank {r}" for r in range(env.world_size) if r not in markers]

    wait_for(missing, timeout=timeout, what="rank finishing pass 1", on_poll=lambda n: bar.update(len(markers) - bar.n))
    bar.close()
    return [markers[r] for r in range(env.world_size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, help="folder of images with sidecar .json files")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes per rank (default: the cores divided by the ranks on this node)")
    ap.add_argument("--edges", type=Path, default=None,
                    help=f"quartiles json to reuse instead of computing them (default: written to DATA_DIR/{EDGES_FILE})")
    ap.add_argument("--wait-timeout", type=float, default=1800.0,
                    help="rank 0 stops when no rank finished pass 1 for this many seconds (default 1800)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any file was refused")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by `deepspeed`
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"{args.data_dir}: not a directory")
    try:
        env = launch_env()
    except ValueError as e:
        ap.error(str(e))
    workers = args.workers or max(1, (os.cpu_count() or 1) // env.local_world_size)
    images = scan_folder(args.data_dir).images
    if not images:
        ap.error(f"{args.data_dir}: no images")
    digest = list_digest(args.data_dir, images)
    marker = pass1_marker(args.data_dir, env.rank, env.world_size)
    marker.unlink(missing_ok=True)  # this run's pass 1 decides, not an earlier run's
    marker.parent.mkdir(exist_ok=True)

    refusals = Refusals()
    mine = env.share(images)
    with Pool(workers) as pool:
        for path, err in tqdm(pool.imap_unordered(stats_job, mine, chunksize=16), total=len(mine),
                              desc=f"color statistics, rank {env.rank}/{env.world_size}"):
            if err is not None:
                refusals.add_error(err, sample=path)
    write_json(marker, {"rank": env.rank, "world_size": env.world_size, "images": digest, "share": len(mine),
                        "refused": refusals.files})
    if env.rank != 0:
        print(f"{env}: pass 1 done for {len(mine)} of {len(images)} images; rank 0 computes quartiles and tokens")
        return 0
    try:
        markers = wait_for_ranks(args.data_dir, env, digest, args.wait_timeout)
    except TimeoutError as e:
        print(f"error: rank 0: {e}", file=sys.stderr)
        return 2
    refusals.files = sorted((f for m in markers for f in m["refused"]), key=lambda f: (f.get("sample", f["path"]), f["path"]))
    refused = {f.get("sample", f["path"]) for f in refusals.files}
    good = [p for p in images if str(p) not in refused]

    if args.edges is not None:
        edges = json.loads(args.edges.read_text())
        missing = [metric for metric, _ in CONTROL_TOKENS.values() if metric not in edges]
        if missing:
            ap.error(f"{args.edges}: missing metrics {missing}")
    else:
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        unfinished: list[str] = []
        for image in tqdm(good, desc="collect statistics"):
            try:
                meta = read_json(image.with_suffix(".json"))
            except Refused:
                continue  # changed since pass 1: pass 2 reports it
            if has_color_stats(meta, METRICS):
                for m in METRICS:
                    values[m].append(meta["color"][m])
            else:
                unfinished.append(str(image))
        if unfinished:
            print(f"error: {len(unfinished)} images have no statistics and were not refused (a json changed "
                  f"during pass 1?), e.g. {unfinished[:3]}: run again", file=sys.stderr)
            return 2
        if not values[METRICS[0]]:
            return refusals.finish(args.data_dir / REFUSED_FILE, usable=0, strict=args.strict)
        edges = quartile_edges(values)
        write_json(args.data_dir / EDGES_FILE, edges)

    changed = tokens = 0
    with Pool(workers) as pool:
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
