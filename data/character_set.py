"""python data/character_set.py SHARDS... --tagger DIR --out characters.csv [--per-bucket 4] [--seed 0] [--workers 16]

The characters file of eval/char_recall.py (and of the in-training recall, eval.characters) from your
own shards and WD tagger, in one pass over the json sidecars:
1. counts every `character` tag (and the `copyright` and count tags 1girl/1boy/... it comes with) over
   the shards, streaming, one shard per task over --workers processes, with a progress bar;
2. keeps the characters the tagger knows (its selected_tags.csv, category 4 = character) and reports
   how many it dropped and the most frequent of those;
3. picks --per-bucket characters at random (--seed) in each train_samples bucket (--buckets, default
   0-99, 100-499, 500-999, 1000-2499, 2500-9999, >=10000), or takes your list (--names FILE: one tag per
   line, as the tagger or the captions spell it) and fills in the counts;
4. writes `name,tag,prompt,train_samples,copyright,bucket` rows, one bucket after another in turn
   (most frequent first, so the first eval.max_characters rows span the buckets), the prompt from
   --template (default "{character}, {copyright}, {count}, solo": the captions' order, character and
   copyright first; {count} is the character's most frequent 1girl/1boy/... tag, {general} its
   --general-tags most frequent other general tags; empty fields are left out), and prints a table
   per bucket. OUT's report (default OUT with .report.json) holds every count, the dropped
   characters, the problems with examples and the speed.

SHARDS are paths, globs, brace patterns or "pipe:" commands, as in data.shards; with --config RUN.yaml
they default to the run's data.shards and the tag spelling follows its data.caption (else the default
CaptionConfig). Counts match the captions the trainer builds: tags are normalised by the caption
builder's own code (underscores to spaces, no case folding) and a sample counts when the loader would
train on it as far as its json, caption and fields tell. NOT counted (reported by reason with shard and
key): samples the loader skips for an unreadable json (bad_json), a .txt that is not UTF-8
(bad_caption_encoding), bad tag or control fields or no caption at all (missing_caption), no image or
latent (missing_image) or an empty one (empty_file). COUNTED: samples the loader skips only after
decoding the image (corrupt or truncated image, too_small, bad_aspect), which this tool does not
decode, and the samples read from a shard before it breaks (the loader trains on those too; the break
is reported as truncated_tar, missing_shard, read_error or pipe_failed). No bad shard or sample stops
the run. train_samples is samples per epoch; caption_dropout and nl_prob then leave the tag text out
of some of their captions.

Exit status: 0 when OUT was written, 1 when no character could be picked (nothing written), 2 on a
usage error (no shards, no tagger tag list, a bad template).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import CaptionConfig, from_dict, load_config  # noqa: E402
from lumina_illus.data.captions import _clean  # noqa: E402
from lumina_illus.data.shards import expand_shards  # noqa: E402
from lumina_illus.evaluation.character_set import (  # noqa: E402
    DEFAULT_EDGES,
    DEFAULT_TEMPLATE,
    ShardCount,
    character_row,
    check_template,
    interleave,
    iter_counts,
    pick_by_bucket,
    slim,
    split_known,
    tagger_characters,
    write_characters,
)
from lumina_illus.evaluation.stats import bucket_label, bucket_of  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="*", help="shard paths, globs, brace patterns or pipe: commands")
    ap.add_argument("--tagger", required=True, help="WD tagger folder (selected_tags.csv, model.onnx)")
    ap.add_argument("--out", default="characters.csv", help="characters CSV to write")
    ap.add_argument("--report", help="JSON report (default: OUT with .report.json)")
    ap.add_argument("--config", help="run YAML: data.shards (when no SHARDS) and data.caption's tag spelling")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading shards")
    ap.add_argument("--per-bucket", type=int, default=4, help="characters drawn per train_samples bucket")
    ap.add_argument("--buckets", default=",".join(map(str, DEFAULT_EDGES)), help="bucket edges, increasing, from 0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw in each bucket")
    ap.add_argument("--min-count", type=int, default=1,
                    help="draw only characters with at least this many samples (0: tagger characters absent "
                         "from the shards may be drawn too, with train_samples 0)")  # fmt: skip
    ap.add_argument("--names", help="file of character tags, one a line (# comments): these rows, in this order")
    ap.add_argument("--template", default=DEFAULT_TEMPLATE,
                    help="prompt: comma-separated fields with {character} {copyright} {count} {general}")
    ap.add_argument("--general-tags", type=int, default=3, help="general tags in {general}")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _names(path: str) -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(ln for ln in lines if ln))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cap, specs = CaptionConfig(), list(args.shards)
    try:
        if args.config:
            run = load_config(args.config)
            cap = from_dict(CaptionConfig, run.data.caption, where="data.caption", prefix="data.caption.")
            specs = specs or list(run.data.shards)
        edges = [int(b) for b in args.buckets.split(",")]
        bucket_of(0, edges)  # increasing, from 0
        check_template(args.template)
        urls = expand_shards(specs)
        known = tagger_characters(args.tagger, cap)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not known:
        print(f"error: {args.tagger}/selected_tags.csv has no character (category 4) tags", file=sys.stderr)
        return 2
    if not (Path(args.tagger) / "model.onnx").is_file():
        print(f"warning: {args.tagger}/model.onnx is missing: eval/char_recall.py will need it", file=sys.stderr)

    # 1. count
    scan, t0 = ShardCount(), time.perf_counter()
    bar = tqdm(total=len(urls), desc="shards", unit="shard", disable=args.quiet)
    for part in iter_counts(urls, cap, args.workers, general="{general}" in args.template):
        scan.add(part)
        bar.update(1)
        bar.set_postfix(samples=scan.samples, characters=len(scan.characters), refresh=False)
    bar.close()
    secs = time.perf_counter() - t0
    speed = {"seconds": round(secs, 3), "shards_per_s": round(len(urls) / secs, 2),
             "samples_per_s": round(scan.samples / secs, 1), "workers": args.workers}  # fmt: skip
    print(f"{len(urls)} shards, {scan.samples} samples read, {scan.counted} counted ({scan.no_character} name no "
          f"character), {len(scan.characters)} character tags; {secs:.1f} s, {speed['shards_per_s']} shards/s, "
          f"{speed['samples_per_s']} samples/s with {args.workers} workers")  # fmt: skip
    if scan.problems:
        print("not counted, by reason (shard reads for truncated_tar, missing_shard, read_error, pipe_failed):")
        for reason, n in sorted(scan.problems.items(), key=lambda kv: -kv[1]):
            print(f"  {reason:<22}{n:>9}   e.g. {scan.examples[reason][0]}")

    # 2. keep what the tagger knows
    kept, dropped = split_known(scan.characters, known)
    if dropped:
        top = ", ".join(f"{f} ({n}{f'; tagger has {h!r}' if h else ''})" for f, n, h in dropped[:10])
        print(f"dropped {len(dropped)} of {len(scan.characters)} character tags the tagger does not know "
              f"({sum(n for _, n, _ in dropped)} tag-samples); most frequent: {top}")  # fmt: skip

    # 3. pick
    names_report: dict[str, list] = {"unknown": [], "absent": []}
    if args.names:
        order = []
        for line in _names(args.names):
            tag = known.get(_clean(line, cap.underscores_to_spaces))
            if tag is None:
                names_report["unknown"].append(line)
            else:
                order.append(tag)
                if tag not in kept:
                    names_report["absent"].append(tag)
        order = list(dict.fromkeys(order))
        if names_report["unknown"]:
            print(f"--names: {len(names_report['unknown'])} not character tags of the tagger, left out: "
                  f"{', '.join(names_report['unknown'][:20])}")  # fmt: skip
        if names_report["absent"]:
            print(f"--names: {len(names_report['absent'])} not in the shards (train_samples 0): "
                  f"{', '.join(names_report['absent'][:20])}")  # fmt: skip
        picked: dict = {}
        for tag in order:
            picked.setdefault(bucket_of(kept.get(tag, 0), edges), []).append(tag)
    else:
        picked = pick_by_bucket(kept, edges, args.per_bucket, args.seed, args.min_count,
                                candidates=list(known.values()) if args.min_count == 0 else ())  # fmt: skip
        order = interleave(picked)
    rows = [character_row(tag, scan, args.template, cap, args.general_tags) for tag in order]

    # 4. tables, file, report
    in_data = {}
    for n in kept.values():
        in_data[bucket_of(n, edges)] = in_data.get(bucket_of(n, edges), 0) + 1
    print(f"\n{'bucket':<12}{'known in data':>14}{'picked':>8}   train_samples of the picked")
    for b in sorted(set(picked) | set(in_data)):
        ns = [kept.get(t, 0) for t in picked.get(b, [])]
        print(f"{bucket_label(*b):<12}{in_data.get(b, 0):>14}{len(ns):>8}   {', '.join(map(str, ns))}")
    if not rows:
        print("no character picked: nothing written", file=sys.stderr)
        return 1
    width = max(len(r["tag"]) for r in rows)
    print(f"\n{'bucket':<12}{'train_samples':>14}  {'tag':<{width}}  prompt")
    for r in rows:
        print(f"{bucket_label(*bucket_of(r['train_samples'], edges)):<12}{r['train_samples']:>14}  "
              f"{r['tag']:<{width}}  {r['prompt']}")  # fmt: skip
    out = write_characters(args.out, rows, edges)
    report = Path(args.report) if args.report else out.with_suffix(".report.json")
    report.write_text(json.dumps({
        "shards": len(urls), "samples": scan.samples, "counted": scan.counted, "no_character": scan.no_character,
        "speed": speed, "problems": dict(scan.problems), "examples": dict(scan.examples),
        "caption": {"underscores_to_spaces": cap.underscores_to_spaces, "separator": cap.separator},
        "edges": edges, "seed": args.seed, "per_bucket": args.per_bucket, "template": args.template,
        "names": names_report if args.names else None,
        "dropped": {"characters": len(dropped), "tag_samples": sum(n for _, n, _ in dropped),
                    "most_frequent": [{"tag": f, "samples": n, "tagger_spelling": h} for f, n, h in dropped[:200]]},
        "characters": {tag: {"samples": n, "copyright": slim(scan.copyrights.get(_clean(tag, cap.underscores_to_spaces))),
                             "count_tags": slim(scan.count_tags.get(_clean(tag, cap.underscores_to_spaces)))}
                       for tag, n in sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))},
        "rows": rows,
    }, indent=1, ensure_ascii=False))  # fmt: skip
    print(f"\n{len(rows)} characters -> {out}; counts, dropped characters and problems -> {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
