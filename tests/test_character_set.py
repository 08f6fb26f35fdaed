"""data/character_set.py: the characters file from the user's shards and tagger. Counts equal the toy
world's known per-character counts and the captions the trainer builds; characters the tagger does not
know are dropped and reported; bucket draws and prompts; bad sidecars and broken shards are counted and
reported by reason, never a crash; the eval's own reader accepts the file."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from photo_corpus import ROOT, run_script
from PIL import Image

from lumina_illus.data.captions import CaptionConfig, build_caption
from lumina_illus.data.shards import expand_shards, iter_tar
from lumina_illus.evaluation.character_set import (
    DEFAULT_TEMPLATE,
    ShardCount,
    character_row,
    check_template,
    interleave,
    pick_by_bucket,
)
from lumina_illus.evaluation.characters import load_characters
from lumina_illus.evaluation.stats import bucket_of
from lumina_illus.toyworld.spec import CATEGORY_CHARACTER, CHARACTERS
from lumina_illus.toyworld.tagger import tag_vocabulary, write_selected_tags
from lumina_illus.toyworld.world import WorldConfig, sample_world, write_world

WORLD = WorldConfig(seed=5, most=30, fewest=3, samples_per_shard=25)
UNKNOWN = CHARACTERS[2]  # left out of the test tagger's tag list


def _cli():
    spec = importlib.util.spec_from_file_location("character_set_cli", ROOT / "data" / "character_set.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _tagger(folder: Path, rows: list[tuple[str, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_selected_tags(folder / "selected_tags.csv", rows)
    (folder / "model.onnx").write_bytes(b"")  # only the tag list is read here
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("charset_world")
    write_world(WORLD, root)
    rows = [r for r in tag_vocabulary([s.tags for s in sample_world(WORLD)]) if r[0] != UNKNOWN.tag]
    rows.append(("absent_character", CATEGORY_CHARACTER, 0))  # known to the tagger, never in the data
    return {"root": root, "shards": str(root / "shards" / "toy-*.tar"), "tagger": _tagger(root / "tagger", rows)}


def test_counts_equal_the_toy_worlds_known_counts_and_the_trainers_captions(toy, tmp_path, capsys):
    out = tmp_path / "characters.csv"
    assert _cli()([toy["shards"], "--tagger", str(toy["tagger"]), "--out", str(out), "--per-bucket", "100",
                   "--workers", "2", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    truth = {ch.tag: n for ch, n in zip(CHARACTERS, WORLD.counts())}
    chars = load_characters(out)  # the reader of eval/char_recall.py and of the in-training recall
    got = {c.tag: c.train_samples for c in chars}
    assert got == {t: n for t, n in truth.items() if t != UNKNOWN.tag}
    assert all(c.name == c.tag for c in chars)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert {t: v["samples"] for t, v in report["characters"].items()} == got
    n_world = len(sample_world(WORLD))
    assert report["samples"] == report["counted"] == n_world and report["problems"] == {}
    assert report["no_character"] == n_world - sum(WORLD.counts())

    # the same numbers from the captions the trainer builds out of the same shards (tags only, no dropout)
    cap = CaptionConfig(caption_dropout=0.0, nl_prob=0.0)
    captions = Counter()
    for url in expand_shards([toy["shards"]]):
        for ts in iter_tar(url):
            caption = build_caption(cap, ts.files["txt"].decode(), json.loads(ts.files["json"]), random.Random(0))
            captions.update(set(caption.split(", ")))
    assert {c.tag: captions[c.tag.replace("_", " ")] for c in chars} == got

    # characters the tagger does not know are dropped and reported, the most frequent named
    assert UNKNOWN.tag not in got
    dropped = report["dropped"]
    assert dropped["characters"] == 1 and dropped["tag_samples"] == truth[UNKNOWN.tag]
    assert dropped["most_frequent"][0]["tag"] == UNKNOWN.tag.replace("_", " ")
    assert f"dropped 1 of 12 character tags the tagger does not know ({truth[UNKNOWN.tag]} tag-samples)" in printed
    assert f"most frequent: {UNKNOWN.tag.replace('_', ' ')} ({truth[UNKNOWN.tag]})" in printed
    assert "absent_character" not in got  # count 0: drawn only with --min-count 0


def test_pool_and_inline_counts_agree_and_min_count_zero_adds_absent_tagger_characters(toy, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    common = ["--tagger", str(toy["tagger"]), "--per-bucket", "100", "--quiet"]
    assert _cli()([toy["shards"], *common, "--out", str(a), "--workers", "1"]) == 0
    assert _cli()([toy["shards"], *common, "--out", str(b), "--workers", "3", "--min-count", "0"]) == 0
    ra = {c.tag: c.train_samples for c in load_characters(a)}
    rb = {c.tag: c.train_samples for c in load_characters(b)}
    assert rb.pop("absent_character") == 0 and ra == rb


def test_run_config_gives_the_shards_and_the_caption_spelling(toy, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({"family": "lumina2", "data": {"shards": [toy["shards"]],
                                                             "caption": {"underscores_to_spaces": False}}}))  # fmt: skip
    out = tmp_path / "characters.csv"
    assert _cli()(["--config", str(run), "--tagger", str(toy["tagger"]), "--out", str(out), "--per-bucket", "100",
                   "--workers", "1", "--quiet"]) == 0  # fmt: skip
    chars = {c.tag: c for c in load_characters(out)}
    truth = {ch.tag: n for ch, n in zip(CHARACTERS, WORLD.counts()) if ch.tag != UNKNOWN.tag}
    assert {t: c.train_samples for t, c in chars.items()} == truth
    assert chars["hoshino_aoi"].prompt == "hoshino_aoi, star_academy, 1girl, solo"  # the captions keep underscores


def test_bucket_draw_is_seeded_per_bucket_and_spans_the_buckets():
    counts = {f"c{n}": n for n in (1, 5, 50, 70, 99, 100, 150, 300, 499, 500, 600, 700, 999, 1000, 2000, 2200, 2499,
                                   2500, 4000, 9999, 10000, 20000, 50000)}  # fmt: skip
    edges = (0, 100, 500, 1000, 2500, 10000)
    picked = pick_by_bucket(counts, edges, per_bucket=2, seed=0, min_count=2)
    assert sorted(picked) == [(0, 100), (100, 500), (500, 1000), (1000, 2500), (2500, 10000), (10000, None)]
    for (lo, hi), tags in picked.items():
        assert len(tags) == 2 and all(lo <= counts[t] < (hi or 1 << 62) for t in tags)
        assert [counts[t] for t in tags] == sorted((counts[t] for t in tags), reverse=True)
    assert "c1" not in picked[(0, 100)]  # below min_count
    assert picked == pick_by_bucket(counts, edges, per_bucket=2, seed=0, min_count=2)
    draws = {tuple(pick_by_bucket(counts, edges, per_bucket=2, seed=s)[(0, 100)]) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # a bucket's draw depends on its own members only: alone, or when another bucket gains a member
    for seed in range(3):
        full = pick_by_bucket(counts, edges, per_bucket=2, seed=seed, min_count=2)
        for b in full:
            alone = {t: n for t, n in counts.items() if bucket_of(n, edges) == b}
            assert pick_by_bucket(alone, edges, per_bucket=2, seed=seed, min_count=2)[b] == full[b]
    for extra in (30, 3000):
        more = pick_by_bucket({**counts, f"c{extra}": extra}, edges, per_bucket=2, seed=0, min_count=2)
        changed = bucket_of(extra, edges)
        assert {b: t for b, t in more.items() if b != changed} == {b: t for b, t in picked.items() if b != changed}
    order = interleave(picked)
    assert [counts[t] >= 10000 for t in order[:1]] == [True]
    first_six = {next(b for b, ts in picked.items() if t in ts) for t in order[:6]}
    assert len(first_six) == 6  # any prefix spans the buckets, most frequent first
    assert pick_by_bucket({"a": 1}, edges, per_bucket=3, seed=0, candidates=["z"], min_count=0)[(0, 100)] == ["a", "z"]


def test_prompts_from_the_template_in_the_captions_spelling():
    scan = ShardCount()
    scan.characters.update({"saber (fate)": 7, "lonely": 2})
    scan.copyrights["saber (fate)"].update({"fate/stay night": 5, "fate (series)": 6})
    scan.count_tags["saber (fate)"].update({"1girl": 6, "solo": 7, "2girls": 1})
    scan.general["saber (fate)"].update({"blonde hair": 7, "armor": 5, "ahoge": 5, "sword": 1})
    cap = CaptionConfig()
    row = character_row("saber_(fate)", scan, DEFAULT_TEMPLATE, cap)
    assert row == {"name": "saber_(fate)", "tag": "saber_(fate)", "prompt": "saber (fate), fate (series), 1girl, solo",
                   "train_samples": 7, "copyright": "fate (series)"}  # fmt: skip
    assert character_row("lonely", scan, DEFAULT_TEMPLATE, cap)["prompt"] == "lonely, solo"  # empty fields left out
    assert character_row("nobody", scan, DEFAULT_TEMPLATE, cap)["train_samples"] == 0
    row = character_row("saber_(fate)", scan, "{count}, {character}, {general}", cap, general_tags=2)
    assert row["prompt"] == "1girl, saber (fate), blonde hair, ahoge"  # ties broken by name
    kept = character_row("saber_(fate)", scan, DEFAULT_TEMPLATE, CaptionConfig(underscores_to_spaces=False))
    assert kept["prompt"] == "saber_(fate), solo" and kept["train_samples"] == 0  # counted as "saber (fate)"
    for bad in ("{copyright}, solo", "{character}, {hair}"):
        with pytest.raises(ValueError, match="placeholder|must contain"):
            check_template(bad)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, samples: list[dict]) -> Path:
    """A shard written member by member (write_shards refuses the bad json these tests need)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, v in s.items():
                if ext != "__key__":
                    data = json.dumps(v).encode() if isinstance(v, dict) else v if isinstance(v, bytes) else v.encode()
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_sidecars_and_broken_shards_are_counted_and_reported_never_a_crash(tmp_path, capsys):
    png, good = _png(), {"tags": {"character": ["hoshino_aoi"], "copyright": ["star_academy"], "general": ["1girl"]}}
    samples = [
        {"__key__": "good1", "png": png, "json": good},
        {"__key__": "spaced", "png": png, "json": {"tags": {"character": ["hoshino aoi "], "general": ["solo"]}}},
        {"__key__": "upper", "png": png, "json": {"tags": {"character": ["Hoshino_Aoi"]}}},
        {"__key__": "badjson", "png": png, "json": b'{"tags": {"character": ["hoshino_aoi"]'},
        {"__key__": "jsonlist", "png": png, "json": b'["hoshino_aoi"]'},
        {"__key__": "badtags", "png": png, "json": b'{"tags": {"character": "hoshino_aoi"}}'},
        {"__key__": "badcontrol", "png": png, "json": {**good, "control": ["high contrast"]}},
        {"__key__": "notags", "png": png, "json": {"width": 8, "height": 8}},
        {"__key__": "badtxt", "png": png, "txt": b"\xff\xfe caption", "json": good},
        {"__key__": "nochar", "png": png, "json": {"tags": {"general": ["scenery"]}}},
        {"__key__": "txtonly", "png": png, "txt": "hoshino aoi on a beach"},
        {"__key__": "noimage", "json": good},
        {"__key__": "emptyimage", "png": b"", "json": good},
    ]
    _tar(tmp_path / "a" / "shard-000000.tar", samples)
    cut = _tar(tmp_path / "b" / "shard-000000.tar", [{"__key__": f"t{i}", "png": png, "json": good} for i in range(6)])
    with tarfile.open(cut) as tar:
        offset = tar.getmember("t3.png").offset_data
    cut.write_bytes(cut.read_bytes()[: offset + 10])  # ends inside the 4th sample's image: 3 samples read
    tagger = _tagger(tmp_path / "tagger", [("hoshino_aoi", CATEGORY_CHARACTER, 10)])
    out = tmp_path / "characters.csv"
    code = _cli()([str(tmp_path / "a" / "*.tar"), str(cut), "pipe:exit 3", "--tagger", str(tagger),
                   "--out", str(out), "--workers", "2", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert [(c.tag, c.train_samples) for c in load_characters(out)] == [("hoshino_aoi", 1 + 1 + 3)]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["problems"] == {"bad_json": 2, "missing_caption": 3, "bad_caption_encoding": 1,
                                  "missing_image": 1, "empty_file": 1, "truncated_tar": 1, "pipe_failed": 1}
    assert report["samples"] == len(samples) + 3 and report["counted"] == 5 + 3
    assert report["no_character"] == 2  # nochar, txtonly: trained on, but name no character
    ex = report["examples"]
    assert any(" badjson: json unreadable" in e for e in ex["bad_json"]) and any(" jsonlist: " in e for e in ex["bad_json"])
    assert {e.split(" ")[1].split(":")[0] for e in ex["missing_caption"]} == {"badtags", "badcontrol", "notags"}
    assert ex["truncated_tar"][0].startswith(f"{cut}: after 3 samples")
    assert ex["pipe_failed"][0].startswith("pipe:exit 3: after 0 samples: command exited with status 3")
    assert "emptyimage" in ex["empty_file"][0] and "noimage" in ex["missing_image"][0]
    for reason in report["problems"]:
        assert f"  {reason}" in printed
    # "Hoshino Aoi" is a different caption text: dropped, with the tagger's spelling as a hint
    assert report["dropped"]["most_frequent"] == [{"tag": "Hoshino Aoi", "samples": 1, "tagger_spelling": "hoshino_aoi"}]


def test_names_list_fills_in_counts_and_reports_unknown_and_absent(toy, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text(f"# my list\n{CHARACTERS[5].tag}\nhoshino aoi\n{UNKNOWN.tag}\nabsent_character\nnot_a_tag\n")
    out = tmp_path / "characters.csv"
    assert _cli()([toy["shards"], "--tagger", str(toy["tagger"]), "--out", str(out), "--names", str(names),
                   "--workers", "1", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = [(c.tag, c.train_samples) for c in load_characters(out)]
    assert rows == [(CHARACTERS[5].tag, WORLD.counts()[5]), ("hoshino_aoi", WORLD.counts()[0]), ("absent_character", 0)]
    assert f"2 not character tags of the tagger, left out: {UNKNOWN.tag}, not_a_tag" in printed
    assert "1 not in the shards (train_samples 0): absent_character" in printed


def test_usage_errors_and_help(tmp_path, toy):
    assert _cli()([toy["shards"], "--tagger", str(tmp_path / "nowhere")]) == 2
    assert _cli()([toy["shards"], "--tagger", str(toy["tagger"]), "--template", "{general}"]) == 2
    assert _cli()([toy["shards"], "--tagger", str(toy["tagger"]), "--buckets", "10,100"]) == 2
    assert _cli()([str(tmp_path / "none-*.tar"), "--tagger", str(toy["tagger"])]) == 2
    res = run_script("character_set.py", "--help")
    assert res.returncode == 0, res.stderr
    assert "python data/character_set.py SHARDS... --tagger DIR --out characters.csv" in res.stdout
    assert "NOT counted" in res.stdout and "--per-bucket" in res.stdout
    assert (ROOT / "data" / "character_set.py").read_text().startswith('"""python data/character_set.py SHARDS...')


class _TwoArgError(Exception):
    """Like ShardReadError and SkipSample: the pool cannot unpickle it in the parent."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


@pytest.mark.timeout(60)
def test_a_bug_in_a_worker_stops_the_count_naming_the_shard(toy, monkeypatch):
    from lumina_illus.evaluation import character_set

    def bug(meta):
        raise _TwoArgError("x", "a bug")

    monkeypatch.setattr(character_set, "tags_of", bug)  # the forked workers inherit it
    urls = expand_shards([toy["shards"]])
    with pytest.raises(RuntimeError, match=r"counting .*toy-00000\d\.tar: _TwoArgError: a bug"):
        list(character_set.iter_counts(urls, CaptionConfig(), workers=2))
