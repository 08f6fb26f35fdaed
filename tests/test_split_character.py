"""data/split_character.py on a real small toy world: base/ holds every sample without the character and
none with it, new/ the first --keep with it (in shard order), images/ the same images as files,
characters.csv the character's row with train_samples = --keep; base + new + the unkept ones = the world.
An unknown tag and a tag with fewer than --keep images stop with exit status 2, a message, and no output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from photo_corpus import run_script

from lumina_illus.data.shards import ShardReadError, expand_shards, iter_tar
from lumina_illus.toyworld.spec import CHARACTERS
from lumina_illus.toyworld.world import WorldConfig, write_world

WORLD = WorldConfig(seed=7, most=30, fewest=3, samples_per_shard=25)  # 155 samples in 7 shards, ~1.5 s
CHAR = CHARACTERS[6]  # 9 images in WORLD
KEEP = 4


def _read(pattern: str) -> list[tuple[str, bytes, str, dict]]:
    """(key, png, caption, json) of every sample of the shards matching `pattern`, in shard order."""
    out = []
    for url in expand_shards([pattern]):
        for s in iter_tar(url):
            assert not isinstance(s, ShardReadError), s
            assert set(s.files) == {"png", "txt", "json"}, (s.key, set(s.files))
            out.append((s.key, s.files["png"], s.files["txt"].decode(), json.loads(s.files["json"])))
    return out


def _has(sample: tuple, tag: str) -> bool:
    return tag in sample[3]["tags"]["character"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split_world")
    write_world(WORLD, root)
    return root


def test_split_puts_every_sample_in_its_place(world, tmp_path):
    out = tmp_path / "newchar"
    r = run_script("split_character.py", str(world), "--tag", CHAR.tag, "--keep", str(KEEP), "--out", str(out),
                   "--samples-per-shard", "50")  # fmt: skip
    assert r.returncode == 0, r.stderr
    everything = _read(str(world / "shards" / "toy-*.tar"))
    with_char = [s for s in everything if _has(s, CHAR.tag)]
    without = [s for s in everything if not _has(s, CHAR.tag)]
    assert len(with_char) == WORLD.counts()[6] > KEEP and len(without) > 50  # several base shards

    base, new = _read(str(out / "base" / "*.tar")), _read(str(out / "new" / "*.tar"))
    # base: every sample without the character, as stored (pixels, caption, tags), none with it
    assert base == without
    assert not any(_has(s, CHAR.tag) for s in base)
    # new: exactly the first KEEP samples with it, in order
    assert new == with_char[:KEEP]
    # images/: the same images as files
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{s[0]}.png" for s in new)
    for s in new:
        assert (out / "images" / f"{s[0]}.png").read_bytes() == s[1]
    # characters.csv: the character's row only, train_samples = KEEP, the rest as in the world's file
    world_row = next(r for r in _rows(world / "characters.csv") if r["tag"] == CHAR.tag)
    assert _rows(out / "characters.csv") == [{**world_row, "train_samples": str(KEEP)}]
    # nothing lost, nothing doubled: base + new + the unkept ones = the world
    unkept = with_char[KEEP:]
    keys = [s[0] for s in base + new + unkept]
    assert len(keys) == len(set(keys)) == len(everything)
    assert set(keys) == {s[0] for s in everything}
    assert f"{len(without)} base samples" in r.stdout and f"{KEEP} of {CHAR.tag!r}" in r.stdout


@pytest.mark.parametrize(
    ("tag", "keep", "message"),
    [("no_such_character", KEEP, "'no_such_character' is not a character tag of"),
     (CHAR.tag, WORLD.counts()[6] + 1, f"{CHAR.tag!r} has {WORLD.counts()[6]} images in")],
)  # fmt: skip
def test_unknown_tag_or_too_few_images_exit_2_with_a_message(world, tmp_path, tag, keep, message):
    out = tmp_path / "newchar"
    r = run_script("split_character.py", str(world), "--tag", tag, "--keep", str(keep), "--out", str(out))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()  # nothing half-written
