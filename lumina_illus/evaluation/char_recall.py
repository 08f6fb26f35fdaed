"""Character recall: does a checkpoint draw a character when prompted with its trigger?

For each character: prompt templates x seeds x sizes are generated, tagged with a WD-format tagger, and
a hit is counted when the character's tag probability reaches the threshold. Recall = hits / images,
with a Wilson interval, per character, per size, and per bucket of training-sample counts. Over many
checkpoints the recall becomes a curve against image samples seen (from checkpoint metadata).

    from lumina_illus.evaluation.char_recall import evaluate
    result = evaluate(generator, characters, tagger, sizes=[(1024, 1024)], seeds=[0])
    result["recall"], result["ci95"]

`evaluate` takes any `families.Generator`, so the trainer calls it on live weights every N steps and
`eval/char_recall.py` calls it on exported checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lumina_illus.evaluation.characters import Character
from lumina_illus.evaluation.color import STAT_KEYS, image_stats
from lumina_illus.evaluation.image_cache import ImageCache, image_key
from lumina_illus.evaluation.stats import DEFAULT_BUCKET_EDGES, group_by_buckets, summarize
from lumina_illus.evaluation.tagger import CATEGORY_CHARACTER, WDTagger
from lumina_illus.families import Generator

# {prompt} is the character's trigger prompt. Three framings, so a hit is not one lucky composition.
DEFAULT_TEMPLATES = (
    "{prompt}, solo, looking at viewer",
    "{prompt}, solo, upper body, simple background",
    "{prompt}, solo, full body, standing, outdoors",
)
# Square at two scales plus portrait and landscape: the seed asks whether resolution is arbitrary.
DEFAULT_SIZES = ((1024, 1024), (768, 768), (832, 1216), (1216, 832))
DEFAULT_SEEDS = (0, 1)
DEFAULT_THRESHOLD = 0.85  # WD v3 taggers' usual character threshold


@dataclass(frozen=True)
class _Job:
    char: int  # index into characters
    prompt: str
    size: tuple[int, int]  # (width, height)
    seed: int


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"1024x1024,832x1216" -> [(1024, 1024), (832, 1216)] (width x height)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise ValueError(f"size {part!r} must look like WIDTHxHEIGHT, e.g. 1024x1024")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _check_tags(characters: Sequence[Character], tagger: WDTagger) -> list[int]:
    cols = []
    for c in characters:
        col = tagger.index(c.tag)
        if tagger.tags[col].category != CATEGORY_CHARACTER:
            raise ValueError(
                f"character {c.name!r}: tag {c.tag!r} has category {tagger.tags[col].category} in "
                f"{tagger.folder / 'selected_tags.csv'}, expected {CATEGORY_CHARACTER} (character)"
            )
        cols.append(col)
    return cols


def evaluate(
    generator: Generator,
    characters: Sequence[Character],
    tagger: WDTagger,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str = "",
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    cache: ImageCache | None = None,
    ckpt_id: str | None = None,
    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall of `characters` under `generator`; images are reused from `cache` when `ckpt_id` is set.

    Returns {"recall", "ci95", "hits", "n", "mean_char_recall", "characters": [...], "per_size": {...},
    "per_bucket": [...], "settings": {...}, "images": {"generated", "cached"}}.
    """
    if not characters:
        raise ValueError("no characters to evaluate")
    if cache is not None and ckpt_id is None:
        raise ValueError("an image cache needs ckpt_id (the images depend on the weights)")
    for tpl in templates:
        if "{prompt}" not in tpl:
            raise ValueError(f"template {tpl!r} lacks the {{prompt}} placeholder")
    cols = _check_tags(characters, tagger)
    jobs = [
        _Job(ci, tpl.format(prompt=c.prompt), (int(w), int(h)), int(seed))
        for ci, c in enumerate(characters) for tpl in templates for (w, h) in sizes for seed in seeds
    ]
    # one size per generate() call: families batch same-size latents without padding
    jobs.sort(key=lambda j: (j.size, j.char, j.prompt, j.seed))
    probs = np.zeros(len(jobs), np.float64)
    colors: list[dict[str, float]] = [{} for _ in jobs]  # colour statistics of every image (per size below)
    generated = cached = 0
    bar = tqdm(total=len(jobs), desc="char_recall", unit="img", disable=not progress)
    i = 0
    while i < len(jobs):
        chunk = [jobs[i]]
        while i + len(chunk) < len(jobs) and len(chunk) < batch_size and jobs[i + len(chunk)].size == jobs[i].size:
            chunk.append(jobs[i + len(chunk)])
        keys = [
            image_key(ckpt_id, j.prompt, negative_prompt, j.size, j.seed, steps, guidance) if cache else ""
            for j in chunk
        ]
        images: list[Image.Image | None] = [cache.get(k) if cache else None for k in keys]
        todo = [n for n, im in enumerate(images) if im is None]
        if todo:
            new = generator.generate(
                [chunk[n].prompt for n in todo], [chunk[n].size for n in todo], [chunk[n].seed for n in todo],
                steps=steps, guidance=guidance, negative_prompt=negative_prompt,
            )
            if len(new) != len(todo):
                raise RuntimeError(f"generator returned {len(new)} images for {len(todo)} prompts")
            for n, im in zip(todo, new):
                images[n] = im
                if cache:
                    cache.put(keys[n], im)
        generated += len(todo)
        cached += len(chunk) - len(todo)
        p = tagger.predict(images, batch_size=batch_size)  # (len(chunk), n_tags)
        for n, j in enumerate(chunk):
            probs[i + n] = p[n, cols[j.char]]
            colors[i + n] = image_stats(images[n])
        i += len(chunk)
        bar.update(len(chunk))
    bar.close()

    hit = probs >= threshold
    per_char = []
    for ci, c in enumerate(characters):
        sel = [k for k, j in enumerate(jobs) if j.char == ci]
        per_char.append({
            "name": c.name, "tag": c.tag, "train_samples": c.train_samples,
            **summarize(int(hit[sel].sum()), len(sel)), "mean_prob": float(probs[sel].mean()),
        })
    per_size = {}
    for s in sizes:
        sel = [k for k, j in enumerate(jobs) if j.size == (int(s[0]), int(s[1]))]
        per_size[size_label(s)] = {**summarize(int(hit[sel].sum()), len(sel)),
                                   "color": {k: float(np.mean([colors[q][k] for q in sel])) for k in STAT_KEYS}}
    total = summarize(int(hit.sum()), len(jobs))
    return {
        **total,
        "mean_char_recall": float(np.mean([c["recall"] for c in per_char])),
        "characters": per_char,
        "per_size": per_size,
        "per_bucket": group_by_buckets(per_char, bucket_edges),
        "settings": {
            "templates": list(templates), "sizes": [list(s) for s in sizes], "seeds": list(seeds),
            "steps": steps, "guidance": guidance, "negative_prompt": negative_prompt,
            "threshold": threshold, "tagger": str(tagger.folder),
        },
        "images": {"generated": generated, "cached": cached},
    }


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table of one evaluation, for stdout."""
    lines = [f"{'character':<28} {'train':>7} {'hits/n':>9} {'recall':>7} {'p_mean':>7}"]
    for c in result["characters"]:
        lines.append(
            f"{c['name'][:28]:<28} {c['train_samples']:>7} {c['hits']:>4}/{c['n']:<4} "
            f"{c['recall']:>7.3f} {c['mean_prob']:>7.3f}"
        )
    lo, hi = result["ci95"]
    lines.append(f"recall {result['recall']:.3f}  (95% Wilson {lo:.3f}-{hi:.3f}, {result['hits']}/{result['n']})")
    lines.append("per size:   " + "  ".join(f"{k} {v['recall']:.3f}" for k, v in result["per_size"].items()))
    lines.append("per bucket: " + "  ".join(
        f"{b['label']} ({b['characters']} chars) {b['recall']:.3f}" for b in result["per_bucket"]))
    return "\n".join(lines)
