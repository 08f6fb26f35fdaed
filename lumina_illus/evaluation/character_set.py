"""Building the recall evaluation's characters file (characters.py) from a dataset's own shards and a
WD tagger: count every character tag over the json sidecars, keep the characters the tagger knows,
pick some across frequency buckets (or take a given list), write prompts. data/character_set.py is
the command line.

    scan = scan_shards(urls, CaptionConfig(), workers=16)        # ShardCount summed over every shard
    known = tagger_characters("wd-swinv2-tagger-v3")             # caption form -> tagger tag
    kept, dropped = split_known(scan.characters, known)
    picked = pick_by_bucket(kept, known, DEFAULT_EDGES, per_bucket=4, seed=0)
    rows = [character_row(tag, known, scan, DEFAULT_TEMPLATE, cap) for tag in ...]

What is counted, so that `train_samples` is what the trainer really sees:
- tags are keyed by their caption form, produced by the caption builder's own normalisation
  (captions._clean with data.caption.underscores_to_spaces; no case folding, as the builder does
  none): `hoshino_aoi` and `hoshino aoi` in two json files are one character, `Hoshino_Aoi` another.
  A tagger tag matches the character whose caption form is the tag's caption form.
- a sample is counted once per character tag it names, when the loader would train on it as far as
  its json, caption and fields tell: samples the loader skips for their json or caption
  (stream.read_caption: bad_json, bad_caption_encoding, missing_caption) or for having no image or
  latent field (missing_image) or an empty one (empty_file) are not counted, but reported by reason
  with shard and key. Skips that need the image decoded (corrupt_image, truncated_image, too_small,
  bad_aspect, bucket_leftover) are not checked, so such samples are counted: the run's
  data/skipped_* metrics say how rare they are.
- a shard that ends early (truncated_tar, missing_shard, read_error, pipe_failed) counts the samples
  read before the break, which the loader delivers too, and is reported with its error.
- the count is samples per epoch; the caption builder then drops the whole caption with
  caption_dropout and writes a natural-language caption instead of tags with nl_prob, so the tag
  text itself is in fewer captions than that.
"""

from __future__ import annotations

import csv
import multiprocessing
import random
import re
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumina_illus.data.captions import CaptionConfig, CaptionError, _clean, tags_of
from lumina_illus.data.shards import IMAGE_EXTS, LATENT_EXT, ShardReadError, iter_tar
from lumina_illus.data.stream import SkipSample, read_caption
from lumina_illus.evaluation.characters import FIELDS
from lumina_illus.evaluation.stats import bucket_label, bucket_of
from lumina_illus.evaluation.tagger import CATEGORY_CHARACTER, load_tags

DEFAULT_EDGES = (0, 100, 500, 1000, 2500, 10000)  # buckets 0-99, 100-499, 500-999, 1000-2499, 2500-9999, >=10000
# comma-separated fields in the caption builder's order (keep_order character, copyright first, then
# general tags); a field whose placeholders are empty is left out; joined with data.caption.separator
DEFAULT_TEMPLATE = "{character}, {copyright}, {count}, solo"
PLACEHOLDERS = ("character", "copyright", "count", "general")
COUNT_TAG = re.compile(r"^\d+\+?(girl|boy|other)s?$")  # 1girl, 2boys, 6+girls, 1other
EXAMPLES_PER_REASON = 3
TOP_GENERAL = 10  # general tags kept per character for the {general} placeholder


@dataclass
class ShardCount:
    """Counts over one shard, or summed over many (`add`). Character keys are caption forms."""

    shards: int = 0
    samples: int = 0  # samples read out of the tars
    counted: int = 0  # samples whose character tags were counted (the loader would train on them)
    characters: Counter = field(default_factory=Counter)  # character -> samples
    copyrights: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # char -> copyright -> n
    count_tags: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # char -> 1girl.. -> n
    general: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # char -> tag -> n
    no_character: int = 0  # counted samples that name no character
    problems: Counter = field(default_factory=Counter)  # reason -> samples (or shard reads) lost to the count
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> "shard key: msg"

    def add(self, other: ShardCount) -> None:
        self.shards += other.shards
        self.samples += other.samples
        self.counted += other.counted
        self.no_character += other.no_character
        self.characters.update(other.characters)
        self.problems.update(other.problems)
        for mine, theirs in ((self.copyrights, other.copyrights), (self.count_tags, other.count_tags),
                             (self.general, other.general)):  # fmt: skip
            for k, c in theirs.items():
                mine[k].update(c)
        for r, ex in other.examples.items():
            self.examples[r].extend(ex[: EXAMPLES_PER_REASON - len(self.examples[r])])

    def problem(self, reason: str, where: str, msg: str) -> None:
        self.problems[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{where}: {msg}"[:300])


def count_shard(url: str, cap: CaptionConfig, general: bool = False) -> ShardCount:
    """Character counts of one shard (module docstring: what is counted). Never raises for bad data:
    every problem is counted in `problems` by reason with up to EXAMPLES_PER_REASON examples."""
    out = ShardCount(shards=1)
    rng = random.Random(0)  # build_caption needs one; only its exceptions matter here
    u = cap.underscores_to_spaces
    for ts in iter_tar(url):
        if isinstance(ts, ShardReadError):
            out.problem(ts.reason, url, f"after {out.samples} samples: {ts}")
            break
        out.samples += 1
        where = f"{url} {ts.key}"
        try:
            meta, _, _ = read_caption(ts, cap, rng, latent_mode=LATENT_EXT in ts.files)
            tags = tags_of(meta)  # read_caption skips it for a latent sample with a cached caption
        except SkipSample as e:
            out.problem(e.reason, where, str(e))
            continue
        except CaptionError as e:
            out.problem("missing_caption", where, str(e))
            continue
        field_ = next((e for e in (LATENT_EXT, *IMAGE_EXTS) if e in ts.files), None)
        if field_ is None:
            out.problem("missing_image", where, f"no image or latent among fields {sorted(ts.files)}")
            continue
        if not ts.files[field_]:
            out.problem("empty_file", where, f"{field_} is empty")
            continue
        out.counted += 1
        chars = sorted({_clean(t, u) for t in tags.get("character", [])})
        if not chars:
            out.no_character += 1
            continue
        copyrights = {_clean(t, u) for t in tags.get("copyright", [])}
        gen = {_clean(t, u) for t in tags.get("general", [])}
        counts = {t for t in gen if COUNT_TAG.match(t) or t == "solo"}
        for ch in chars:
            out.characters[ch] += 1
            out.copyrights[ch].update(copyrights)
            out.count_tags[ch].update(counts)
            if general:
                out.general[ch].update(gen - counts)
    return out


def _count_star(args: tuple[str, CaptionConfig, bool]) -> ShardCount:
    """count_shard in a pool worker. A bug comes back as a RuntimeError naming the shard with the
    worker's traceback: an exception the pool cannot unpickle (one whose __init__ takes other
    arguments than its args) would leave the pool waiting forever."""
    try:
        return count_shard(*args)
    except Exception as e:
        raise RuntimeError(f"counting {args[0]}: {type(e).__name__}: {e}\n{traceback.format_exc()}") from None


def iter_counts(urls: Sequence[str], cap: CaptionConfig, workers: int, general: bool = False) -> Iterator[ShardCount]:
    """count_shard of every url, in completion order, over a pool of `workers` processes (1: inline)."""
    jobs = [(u, cap, general) for u in urls]
    if workers <= 1 or len(urls) <= 1:
        yield from map(_count_star, jobs)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(urls))) as pool:
        yield from pool.imap_unordered(_count_star, jobs)


def tagger_characters(folder: str | Path, cap: CaptionConfig) -> dict[str, str]:
    """Caption form -> tagger tag of every character-category row of the tagger's selected_tags.csv."""
    known: dict[str, str] = {}
    for t in load_tags(Path(folder) / "selected_tags.csv"):
        if t.category == CATEGORY_CHARACTER:
            known.setdefault(_clean(t.name, cap.underscores_to_spaces), t.name)
    return known


def _loose(tag: str) -> str:
    return tag.replace("_", " ").strip().lower()


def split_known(counts: Counter, known: dict[str, str]) -> tuple[dict[str, int], list[tuple[str, int, str]]]:
    """(tagger tag -> samples for characters the tagger knows, dropped [(caption form, samples, hint)]
    most frequent first). `hint` names a tagger tag that differs only in case or underscores, if any."""
    loose = {_loose(t): t for t in known.values()}
    kept: dict[str, int] = {}
    dropped = []
    for form, n in counts.items():
        if form in known:
            kept[known[form]] = n
        else:
            dropped.append((form, n, loose.get(_loose(form), "")))
    dropped.sort(key=lambda d: (-d[1], d[0]))
    return kept, dropped


def pick_by_bucket(
    counts: dict[str, int], edges: Sequence[int], per_bucket: int, seed: int, min_count: int = 1,
    candidates: Sequence[str] = (),
) -> dict[tuple[int, int | None], list[str]]:
    """Bucket (lo, hi) -> up to `per_bucket` characters drawn at random (seeded per bucket, so one
    bucket's draw does not depend on another's members), most frequent first. Characters with fewer
    than `min_count` samples are not drawn; `candidates` (tagger tags absent from the data, count 0)
    join bucket 0 when min_count is 0. Every bucket is listed, empty ones too."""
    pool: dict[tuple[int, int | None], list[str]] = {
        (lo, hi): [] for lo, hi in zip(edges, [*edges[1:], None])}  # fmt: skip
    everyone = dict(counts)
    for tag in candidates:
        everyone.setdefault(tag, 0)
    for tag, n in everyone.items():
        if n >= min_count:
            pool[bucket_of(n, edges)].append(tag)
    out = {}
    for b, tags in pool.items():
        tags.sort(key=lambda t: (-everyone[t], t))
        chosen = random.Random(f"character_set:{seed}:{b[0]}").sample(tags, min(per_bucket, len(tags)))
        out[b] = sorted(chosen, key=lambda t: (-everyone[t], t))
    return out


def interleave(picked: dict[tuple[int, int | None], list[str]]) -> list[str]:
    """One character of each bucket in turn, most frequent bucket first: any prefix of the file (the
    in-training recall reads the first eval.max_characters) spans the buckets."""
    lists = [picked[b] for b in sorted(picked, key=lambda b: -b[0])]
    return [ls[i] for i in range(max(map(len, lists), default=0)) for ls in lists if i < len(ls)]


def check_template(template: str) -> None:
    """ValueError for a template with an unknown placeholder or none naming the character."""
    names = set(re.findall(r"{(\w*)}", template))
    bad = sorted(names - set(PLACEHOLDERS))
    if bad:
        raise ValueError(f"prompt template {template!r}: unknown placeholders {bad}; known: {list(PLACEHOLDERS)}")
    if "character" not in names:
        raise ValueError(f"prompt template {template!r} must contain {{character}}")


def _top(c: Counter | None) -> str:
    return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] if c else ""


def character_row(
    tag: str, scan: ShardCount, template: str, cap: CaptionConfig, general_tags: int = 3,
) -> dict[str, Any]:
    """The characters-file row of tagger tag `tag`: prompt from `template` with the character's caption
    form, its most frequent copyright, its most frequent count tag (1girl, 1boy, ...) and its
    `general_tags` most frequent other general tags, in the captions' spelling."""
    form = _clean(tag, cap.underscores_to_spaces)
    counts = Counter({k: v for k, v in (scan.count_tags.get(form) or {}).items() if k != "solo"})
    gen = scan.general.get(form) or Counter()
    values = {
        "character": form,
        "copyright": _top(scan.copyrights.get(form)),
        "count": _top(counts),
        "general": cap.separator.join(t for t, _ in sorted(gen.items(), key=lambda kv: (-kv[1], kv[0]))[:general_tags]),
    }
    parts = [p.strip().format(**values).strip() for p in template.split(",")]
    return {"name": tag, "tag": tag, "prompt": cap.separator.join(p for p in parts if p),
            "train_samples": scan.characters.get(form, 0), "copyright": values["copyright"]}


def write_characters(path: str | Path, rows: Sequence[dict[str, Any]], edges: Sequence[int]) -> Path:
    """The characters CSV: the columns characters.load_characters reads, then copyright and bucket."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=[*FIELDS, "copyright", "bucket"])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "bucket": bucket_label(*bucket_of(r["train_samples"], edges))})
    return path


def slim(c: Counter | None, n: int = TOP_GENERAL) -> dict[str, int]:
    """The n most frequent entries of a counter, for the JSON report."""
    return dict(sorted((c or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:n])
