"""python bench/character_set.py [--shards 8] [--samples 1000] [--image-kb 300] [--workers 1,2] [--repeats 2]

Counting speed of data/character_set.py (lumina_illus.evaluation.character_set.iter_counts): shards
and samples per second over synthetic danbooru-like shards (--samples per shard, each an image field
of --image-kb random bytes, never decoded, plus a json with 1-2 characters out of 5000, copyright,
count tag and ~30 general tags, control tokens), written once to a temporary folder, read with each
--workers count in turn, --repeats rounds, best round kept. The files stay in the page cache, so this
is the CPU side; a cold disk or a network read adds its own time per byte.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.data.captions import CaptionConfig  # noqa: E402
from lumina_illus.data.shards import write_shards  # noqa: E402
from lumina_illus.evaluation.character_set import ShardCount, iter_counts  # noqa: E402

GENERAL = [f"general_tag_{i}" for i in range(2000)]


def sample(i: int, rng: random.Random, image: bytes) -> dict:
    chars = [f"character_{min(int(rng.paretovariate(0.8)), 5000)}" for _ in range(rng.choice((1, 1, 1, 2)))]
    tags = {"character": chars, "copyright": [f"series_{hash(c) % 300}" for c in chars],
            "general": [rng.choice(("1girl", "1boy", "2girls")), "solo", *rng.sample(GENERAL, 30)],
            "artist": [f"artist_{rng.randrange(10000)}"], "meta": ["highres"]}  # fmt: skip
    control = {"contrast": "high contrast", "brightness": "bright", "saturation": "vivid colors"}
    return {"__key__": f"{i:09d}", "jpg": image, "json": {"tags": tags, "width": 1024, "height": 1536,
                                                           "control": control}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--image-kb", type=int, default=300, help="bytes of each image field (not decoded)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    rng = random.Random(0)
    image = os.urandom(args.image_kb * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        n = args.shards * args.samples
        write_shards((sample(i, rng, image) for i in range(n)), tmp, args.samples, verify=False)
        urls = sorted(str(p) for p in Path(tmp).glob("shard-*.tar"))
        mb = sum(os.path.getsize(u) for u in urls) / 2**20
        print(f"{len(urls)} shards x {args.samples} samples, {mb / len(urls):.0f} MB per shard, {os.cpu_count()} CPUs")
        print(f"{'workers':>8}{'shards/s':>10}{'samples/s':>11}{'MB/s':>8}")
        for w in (int(x) for x in args.workers.split(",")):
            best = float("inf")
            for _ in range(args.repeats):
                total, t0 = ShardCount(), time.perf_counter()
                for part in iter_counts(urls, CaptionConfig(), w):
                    total.add(part)
                best = min(best, time.perf_counter() - t0)
                assert total.samples == n and total.counted == n, (total.samples, total.counted)
            print(f"{w:>8}{len(urls) / best:>10.2f}{n / best:>11.0f}{mb / best:>8.0f}")


if __name__ == "__main__":
    main()
