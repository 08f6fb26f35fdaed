"""Sampling a toy world from a seed and writing it as a dataset: webdataset shards (.png + .txt + .json,
through the project's shard writer, with control-token annotations) and characters.csv for the eval.

    scenes = sample_world(WorldConfig(seed=0))         # deterministic list of WorldSample
    info = write_world(WorldConfig(seed=0), "runs/toy/world")

The same seed always gives the same scenes, tags, captions and image bytes. Held-out renders for the
tagger come from `sample_world` with another seed.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from lumina_illus.config import check
from lumina_illus.toyworld import WORLD_VERSION
from lumina_illus.toyworld.render import Scene, render
from lumina_illus.toyworld.spec import (
    BACKGROUND_TAGS,
    BACKGROUNDS,
    CHARACTERS,
    EXPRESSIONS,
    FRAMINGS,
    POSE_TAGS,
    POSES,
    RATING,
    SIZES,
    Character,
    long_tail_counts,
    tag_text,
)


@dataclass
class WorldConfig:
    seed: int = 0  # every per-sample choice derives from it
    most: int = 2000  # images of the most frequent character
    fewest: int = 20  # images of the rarest character (geometric long tail in between)
    scenery_fraction: float = 0.05  # extra background-only images ("no_humans, scenery")
    samples_per_shard: int = 500

    def __post_init__(self) -> None:
        check(self.most >= self.fewest >= 1, "most", "must be >= fewest >= 1")
        check(0.0 <= self.scenery_fraction < 1.0, "scenery_fraction", "must be in [0, 1)")
        check(self.samples_per_shard >= 1, "samples_per_shard", "must be >= 1")

    def counts(self) -> list[int]:
        """Training images per character, in roster order (most frequent first)."""
        return long_tail_counts(len(CHARACTERS), self.most, self.fewest)


@dataclass(frozen=True)
class WorldSample:
    key: str  # webdataset key, unique in the world
    scene: Scene
    tags: dict[str, list[str]]  # category -> danbooru tags (character, copyright, general, meta)
    caption: str  # natural-language caption (.txt)


def random_scene(character: Character | None, rng: random.Random) -> Scene:
    """One scene with every free choice (background, pose, framing, size, placement) drawn from `rng`."""
    return Scene(
        character=character,
        background=rng.choice(BACKGROUNDS),
        pose=rng.choice(POSES),
        framing=rng.choice(FRAMINGS),
        expression=rng.choice(EXPRESSIONS),
        size=rng.choice(SIZES),
        x=rng.uniform(0.35, 0.65),
        scale=rng.uniform(0.85, 1.1),
        detail_seed=rng.randrange(2**31),
    )


def scene_tags(scene: Scene, rng: random.Random) -> dict[str, list[str]]:
    """Booru-style tags of a scene by category; `rng` only picks the optional meta tags."""
    w, h = scene.size
    general = list(BACKGROUND_TAGS[scene.background])
    tags: dict[str, list[str]] = {"character": [], "copyright": []}
    ch = scene.character
    if ch is None:
        general = ["no_humans", "scenery", *general]
    else:
        tags["character"] = [ch.tag]
        tags["copyright"] = [ch.copyright]
        general = [ch.count_tag, "solo", *ch.look_tags(), *POSE_TAGS[scene.pose], scene.framing, scene.expression,
                   "looking_at_viewer", *general]  # fmt: skip
    tags["general"] = general
    meta = ["highres"] if max(w, h) >= 128 else (["lowres"] if max(w, h) <= 64 else [])
    if rng.random() < 0.3:
        meta.append("commentary_request")
    tags["meta"] = meta
    return tags


def scene_caption(scene: Scene) -> str:
    """A natural-language caption naming the character, its look, pose and place."""
    places = {
        "white": "on a plain white background", "blue": "on a plain blue background",
        "pink": "on a plain pink background", "gradient": "on a soft gradient background",
        "outdoors": "outdoors on a sunny day", "night": "under a starry night sky",
        "indoors": "in a room with a wooden floor", "sunset": "outdoors at sunset",
    }  # fmt: skip
    place = places[scene.background]
    ch = scene.character
    if ch is None:
        return f"A scenery illustration with no people, {place}."
    look = f"{ch.hair_style.replace('_', ' ')} {ch.hair_color} hair and {ch.eye_color} eyes"
    outfit = f"a {ch.outfit_color} {ch.outfit.replace('_', ' ')}"
    acc = f" and {tag_text(ch.accessory)}" if ch.accessory else ""
    pose = {"standing": "standing", "arms_up": "with arms raised", "waving": "waving",
            "hands_on_hips": "with hands on hips"}[scene.pose]  # fmt: skip
    framing = "full body" if scene.framing == "full_body" else "upper body"
    who = "girl" if ch.gender == "girl" else "boy"
    return (f"{tag_text(ch.tag)} from {tag_text(ch.copyright)}, a {who} with {look}, wearing {outfit}{acc}, "
            f"{pose}, {framing}, {place}.")  # fmt: skip


def sample_world(cfg: WorldConfig) -> list[WorldSample]:
    """Every sample of the world, shuffled (so each shard mixes characters); deterministic in cfg."""
    plan: list[Character | None] = []
    for ch, n in zip(CHARACTERS, cfg.counts()):
        plan += [ch] * n
    plan += [None] * round(len(plan) * cfg.scenery_fraction)
    random.Random(f"toyworld-order:{cfg.seed}").shuffle(plan)
    out = []
    for i, ch in enumerate(plan):
        rng = random.Random(f"toyworld:{cfg.seed}:{i}")  # per-sample stream: independent of the others
        scene = random_scene(ch, rng)
        out.append(WorldSample(f"{i:07d}", scene, scene_tags(scene, rng), scene_caption(scene)))
    return out


def sample_json(sample: WorldSample) -> dict[str, Any]:
    """The .json of a sample (schema of lumina_illus.data.captions), before control-token annotation."""
    w, h = sample.scene.size
    return {"tags": sample.tags, "width": w, "height": h, "rating": RATING}


def write_characters_csv(path: str | Path, counts: list[int]) -> Path:
    """characters.csv for eval/char_recall.py: `name,tag,prompt,train_samples`, most frequent first."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["name", "tag", "prompt", "train_samples"])
        for ch, n in zip(CHARACTERS, counts):
            wr.writerow([ch.name, ch.tag, ch.prompt, n])
    return path


def render_samples(samples: list[WorldSample], desc: str = "render") -> list[Image.Image]:
    return [render(s.scene) for s in tqdm(samples, desc=desc, unit="img", leave=False)]


def world_info(cfg: WorldConfig) -> dict[str, Any]:
    """What identifies a world on disk; components and shards are cached against it."""
    return {"version": WORLD_VERSION, **asdict(cfg)}


def write_world(cfg: WorldConfig, out_dir: str | Path) -> dict[str, Any]:
    """Render the world into `out_dir/shards/toy-*.tar` (+ manifest.json) through the project's shard
    writer, with control tokens (data/control.py: colour statistics, levels by the world's quartiles),
    and write `out_dir/characters.csv` and `out_dir/examples/<tag>.png`; returns the shard manifest."""
    from lumina_illus.data.control import METRICS, color_stats, control_tokens, is_colorful, quartile_edges
    from lumina_illus.data.shards import write_shards

    out = Path(out_dir)
    samples = sample_world(cfg)
    # pass 1: render once, keep the PNG bytes (~13 KB each) and the colour statistics
    pngs, stats = [], []
    for s in tqdm(samples, desc="toy world renders", unit="img"):
        img = render(s.scene)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        stats.append(color_stats(img))
    # the control-token levels are quartiles over this dataset, as annotate_colors.py does for real data
    edges = quartile_edges({m: [st[m] for st in stats] for m in METRICS})

    def records():
        for s, png, st in zip(samples, pngs, stats):
            meta = sample_json(s)
            meta.update(color=st, control=control_tokens(st, edges), colorful=is_colorful(st))
            yield {"__key__": s.key, "png": png, "txt": s.caption, "json": meta}

    manifest = write_shards(records(), out / "shards", cfg.samples_per_shard, prefix="toy")
    write_characters_csv(out / "characters.csv", cfg.counts())
    write_examples(out / "examples", samples, pngs)
    return manifest


def write_examples(folder: Path, samples: list[WorldSample], pngs: list[bytes]) -> None:
    """`folder/<tag>.png`: each character's first training image (eval/char_recall.py's report shows it)."""
    folder.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for s, png in zip(samples, pngs):
        ch = s.scene.character
        if ch is not None and ch.tag not in done:
            (folder / f"{ch.tag}.png").write_bytes(png)
            done.add(ch.tag)
