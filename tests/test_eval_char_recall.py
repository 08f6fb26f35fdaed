"""Character recall against known truth: a ShapeGenerator that knows some characters at some sizes and
seeds, tagged by an ONNX WD-format tagger whose behaviour is fixed by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from test_eval_toys import COLOURS, ShapeGenerator, build_toy_tagger, draw_disk

from lumina_illus.evaluation.char_recall import evaluate, format_table, parse_sizes
from lumina_illus.evaluation.characters import Character, load_characters
from lumina_illus.evaluation.curves import write_curves
from lumina_illus.evaluation.image_cache import ImageCache, checkpoint_id
from lumina_illus.evaluation.stats import bucket_of, group_by_buckets, wilson_interval
from lumina_illus.evaluation.tagger import WDTagger, load_tags, wd_preprocess

CHARS = [
    Character("Alice", "alice", "1girl, trigger_alice", 5000),
    Character("Bob", "bob", "1boy, trigger_bob", 2600),
    Character("Carol", "carol", "1girl, trigger_carol", 300),
    Character("Dave", "dave", "1boy, trigger_dave", 50),
]
SIZES = [(64, 64), (48, 80)]
SEEDS = [0, 1]
TEMPLATES = ["{prompt}, solo", "{prompt}, upper body"]


def skill(tag: str, size: tuple[int, int], seed: int) -> bool:
    """Alice always; Bob only square; Carol only even seeds; Dave never."""
    return {"alice": True, "bob": size[0] == size[1], "carol": seed % 2 == 0, "dave": False}[tag]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> WDTagger:
    return WDTagger(build_toy_tagger(tmp_path_factory.mktemp("tagger")))


def run(gen, tagger, **kw):
    return evaluate(gen, CHARS, tagger, sizes=SIZES, seeds=SEEDS, templates=TEMPLATES, batch_size=3,
                    progress=False, **kw)


# ---------------------------------------------------------------------------------------------- WD v3


def test_wd_preprocess_pixel_by_pixel():
    rng = np.random.default_rng(0)
    w, h = 30, 20
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, 255)  # fully transparent or opaque
    img = Image.fromarray(rgba, "RGBA")
    # reference, written out step by step: transparent -> white, centred on a white square, BGR float
    rgb = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)  # (20, 30, 3)
    square = np.full((30, 30, 3), 255, np.uint8)
    top = (30 - 20) // 2
    square[top : top + 20] = rgb
    np.testing.assert_array_equal(wd_preprocess(img, 30), square[:, :, ::-1].astype(np.float32))
    # with a resize: bicubic of the padded square, then BGR
    resized = np.asarray(Image.fromarray(square).resize((16, 16), Image.BICUBIC), dtype=np.float32)
    out = wd_preprocess(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, resized[:, :, ::-1])


def test_wd_preprocess_composites_partial_alpha_onto_white():
    # SmilingWolf's wd-tagger Space (app.py, Predictor.prepare_image) and wdv3_timm.py (pil_ensure_rgb)
    # paste the image over an opaque white canvas with PIL's alpha_composite: the "over" operator,
    # out = a * colour + (1 - a) * 255 with a = alpha / 255. Written out here in floats, independently
    # of PIL, for every alpha value 0..255 against colours spanning 0..255.
    c, alpha = np.meshgrid(np.arange(256), np.arange(256))  # (256, 256) each: columns colour, rows alpha
    rgba = np.stack([c, 255 - c, (7 * c) % 256, alpha], -1).astype(np.uint8)  # (256, 256, 4)
    a = rgba[..., 3:] / 255.0  # (256, 256, 1)
    over_white = rgba[..., :3] * a + 255.0 * (1 - a)  # (256, 256, 3) RGB
    out = wd_preprocess(Image.fromarray(rgba, "RGBA"), 256)
    np.testing.assert_allclose(out[:, :, ::-1], over_white, rtol=0, atol=1)  # PIL composites in integers
    # grey + alpha, tall: composited, then centred on the white square and resized like any image
    la = np.stack([c[:100, ::4], alpha[:100, ::4]], -1).astype(np.uint8)  # (100, 64, 2): tall
    grey = la[..., :1] * (la[..., 1:] / 255.0) + 255.0 * (1 - la[..., 1:] / 255.0)  # (100, 64, 1)
    square = np.full((100, 100, 3), 255.0)
    square[:, 18:82] = grey  # (100 - 64) // 2 = 18 white columns on the left
    out = wd_preprocess(Image.fromarray(la, "LA"), 100)
    np.testing.assert_allclose(out, square, rtol=0, atol=1)
    resized = Image.fromarray(np.round(square).astype(np.uint8)).resize((48, 48), Image.BICUBIC)
    np.testing.assert_allclose(wd_preprocess(Image.fromarray(la, "LA"), 48), np.asarray(resized, np.float32),
                               rtol=0, atol=1)


def test_wd_preprocess_tall_image_pads_left_right_and_flips_channels():
    img = Image.new("RGB", (5, 8), (200, 10, 0))  # tall red: pad 3 columns -> left 1, right 2
    out = wd_preprocess(img, 8)
    assert (out[:, :1] == 255).all() and (out[:, 6:] == 255).all()
    np.testing.assert_array_equal(out[:, 1:6], np.broadcast_to(np.array([0, 10, 200], np.float32), (8, 5, 3)))


def test_tagger_folder_errors_name_the_file(tmp_path, tagger):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        WDTagger(tmp_path)
    bad = tmp_path / "selected_tags.csv"
    bad.write_text("tag_id,name,category,count\n1,foo,x,3\n")
    with pytest.raises(ValueError, match=r"selected_tags.csv:2: field 'category'"):
        load_tags(bad)
    with pytest.raises(KeyError, match="nobody"):
        tagger.index("nobody")
    with pytest.raises(ValueError, match="category 0"):
        evaluate(ShapeGenerator(skill), [Character("x", "white_background", "p", 1)], tagger, progress=False)


# ---------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 48), (1, 1), (250, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    lo, hi = wilson_interval(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    # and the textbook formula, once, by hand
    z, p = 1.959963984540054, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((max(0, c - half), min(1, c + half)))


def test_buckets():
    assert bucket_of(0) == (0, 100) and bucket_of(99) == (0, 100) and bucket_of(100) == (100, 500)
    assert bucket_of(2500) == (2500, 5000) and bucket_of(10**6) == (10000, None)
    per_char = [{"train_samples": 50, "hits": 0, "n": 8}, {"train_samples": 300, "hits": 4, "n": 8},
                {"train_samples": 2600, "hits": 4, "n": 8}, {"train_samples": 5000, "hits": 8, "n": 8}]
    got = group_by_buckets(per_char, edges=(0, 1000, 3000))
    assert [(b["label"], b["characters"], b["hits"], b["n"]) for b in got] == [
        ("0-999", 2, 4, 16), ("1000-2999", 1, 4, 8), (">=3000", 1, 8, 8)]
    assert got[0]["ci95"] == list(wilson_interval(4, 16))
    with pytest.raises(ValueError, match="increasing"):
        bucket_of(5, edges=(0, 10, 5))


# ---------------------------------------------------------------------------------------------- recall


def test_recall_against_known_truth(tagger):
    res = run(ShapeGenerator(skill), tagger)
    per = {c["name"]: (c["hits"], c["n"]) for c in res["characters"]}
    n = len(SIZES) * len(SEEDS) * len(TEMPLATES)
    assert per == {"Alice": (n, n), "Bob": (n // 2, n), "Carol": (n // 2, n), "Dave": (0, n)}
    assert (res["hits"], res["n"]) == (16, 32) and res["recall"] == 0.5
    assert res["ci95"] == list(wilson_interval(16, 32))
    assert res["per_size"]["64x64"]["hits"] == 10 and res["per_size"]["48x80"]["hits"] == 6
    assert [(b["label"], b["hits"], b["n"]) for b in res["per_bucket"]] == [
        ("0-99", 0, 8), ("100-499", 4, 8), ("2500-4999", 4, 8), ("5000-9999", 8, 8)]
    mp = {c["name"]: c["mean_prob"] for c in res["characters"]}
    assert mp["Alice"] > 0.85 > 0.2 > mp["Dave"]
    table = format_table(res)
    assert "Alice" in table and "recall 0.500" in table
    # colour statistics per size, the mean over that size's images (the white-collapse measure among them)
    from lumina_illus.evaluation.color import STAT_KEYS, image_stats

    for label, (w, h) in (("64x64", (64, 64)), ("48x80", (48, 80))):
        imgs = [ShapeGenerator(skill).generate([CHARS[c].prompt], [(w, h)], [sd])[0] for c in range(4) for sd in SEEDS]
        got = res["per_size"][label]["color"]
        assert set(got) == set(STAT_KEYS)
        for k in ("white_frac", "saturation_mean"):  # templates do not change the toy images: an exact mean
            assert got[k] == pytest.approx(np.mean([image_stats(im)[k] for im in imgs]))


def test_sizes_a_family_cannot_generate_are_named(tmp_path):
    from lumina_illus.families import check_sizes

    check_sizes([(48, 80), (192, 64)], 16, "--sizes")
    with pytest.raises(ValueError, match=r"--sizes \(lumina2\): 50x50, 64x40: width and height must be positive "
                                         r"multiples of 16"):
        check_sizes([(50, 50), (64, 64), (64, 40)], 16, "--sizes (lumina2)")


def test_cache_second_run_generates_nothing(tmp_path, tagger):
    cache = ImageCache(tmp_path / "cache")
    first = ShapeGenerator(skill)
    a = run(first, tagger, cache=cache, ckpt_id="ckptA")
    assert len(first.calls) == 32 and a["images"] == {"generated": 32, "cached": 0}
    second = ShapeGenerator(lambda *x: False)  # would score 0 if it were asked for anything
    b = run(second, tagger, cache=cache, ckpt_id="ckptA")
    assert second.calls == [] and b["images"] == {"generated": 0, "cached": 32}
    assert b["characters"] == a["characters"]
    # a new seed only generates the new images; another checkpoint id generates everything
    third = ShapeGenerator(skill)
    evaluate(third, CHARS, tagger, sizes=SIZES, seeds=[0, 1, 2], templates=TEMPLATES, cache=cache,
             ckpt_id="ckptA", progress=False)
    assert len(third.calls) == 16 and {s for _, _, s in third.calls} == {2}
    fourth = ShapeGenerator(skill)
    run(fourth, tagger, cache=cache, ckpt_id="ckptB")
    assert len(fourth.calls) == 32


def test_characters_file(tmp_path):
    f = tmp_path / "chars.csv"
    f.write_text("name,tag,prompt,train_samples\nAlice,alice,\"1girl, trigger_alice\",5000\n")
    assert load_characters(f) == [Character("Alice", "alice", "1girl, trigger_alice", 5000)]
    f.write_text("name,tag,prompt,train_samples\nAlice,alice,x,many\n")
    with pytest.raises(ValueError, match=r"chars.csv:2: field 'train_samples'"):
        load_characters(f)
    f.write_text("name,tag,train_samples\nAlice,alice,5\n")
    with pytest.raises(ValueError, match="header lacks \\['prompt'\\]"):
        load_characters(f)
    assert parse_sizes("64x64, 48x80") == SIZES
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_sizes("64")


# ---------------------------------------------------------------------------------------------- curves


def test_curve_plot_is_written_and_shows_both_runs(tmp_path):
    pt = lambda s, r: {"samples_seen": s, "step": s // 10, "path": "x", "recall": r, "ci95": [r / 2, (1 + r) / 2],  # noqa: E731
                       "hits": 0, "n": 0, "per_bucket": {}}
    curves = {"lumina": [pt(1000, 0.1), pt(2000, 0.4), pt(3000, 0.7)], "sdxl": [pt(1000, 0.05), pt(3000, 0.2)]}
    js, png = write_curves(curves, tmp_path)
    assert json.loads(js.read_text())["sdxl"][1]["recall"] == 0.2
    im = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert im.shape == (500, 800, 3)
    for colour in [(31, 119, 180), (255, 127, 14)]:  # matplotlib C0 and C1: one line per run
        assert (np.abs(im - colour).sum(-1) < 10).sum() > 100, colour


def _fake_export(ckpt: Path, step: int, samples: int, run: str) -> Path:
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"family": "lumina2", "step": step, "samples_seen": samples, "run": run}))
    return ckpt


def test_cli_over_run_folders_from_cache(tmp_path, tagger, capsys):
    """The CLI over two run folders whose images are all cached: discovery, ordering by samples seen,
    per-checkpoint JSON, curve JSON/PNG, and no generator is ever loaded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("char_recall_cli", Path(__file__).parents[1] / "eval/char_recall.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    chars = tmp_path / "chars.csv"
    chars.write_text("name,tag,prompt,train_samples\n" + "".join(
        f"{c.name},{c.tag},\"{c.prompt}\",{c.train_samples}\n" for c in CHARS))
    out = tmp_path / "out"
    cache = ImageCache(out / "cache")
    runs = {"runA": [(200, 6400, 0), (100, 3200, 1)], "runB": [(100, 3200, 2)]}  # (step, samples, skill level)
    levels = [lambda t, s, e: t == "alice", skill, lambda *a: True]
    for run_name, ckpts in runs.items():
        for step, samples, level in ckpts:
            ck = _fake_export(tmp_path / run_name / "ckpt" / f"step_{step:07d}", step, samples, run_name)
            run(ShapeGenerator(levels[level]), tagger, cache=cache, ckpt_id=checkpoint_id(ck))
    curves = cli.main([str(tmp_path / "runA"), "--compare", str(tmp_path / "runB"), "--characters", str(chars),
                       "--tagger", str(tagger.folder), "--out", str(out), "--sizes", "64x64,48x80", "--seeds", "0,1",
                       "--templates", str(_templates(tmp_path)), "--buckets", "0,1000", "--wandb", "disabled", "--quiet", "--threads", "1"])
    assert [p["samples_seen"] for p in curves["runA"]] == [3200, 6400]
    assert [p["recall"] for p in curves["runA"]] == [0.5, 0.25] and curves["runB"][0]["recall"] == 1.0
    saved = json.loads((out / "runA" / "step_0000100.json").read_text())
    assert saved["checkpoint"]["samples_seen"] == 3200 and saved["images"]["generated"] == 0
    assert [(b["label"], b["hits"], b["n"]) for b in saved["per_bucket"]] == [("0-999", 4, 16), (">=1000", 12, 16)]
    assert (out / "curve.png").is_file() and set(json.loads((out / "curve.json").read_text())) == {"runA", "runB"}
    assert "recall 0.500" in capsys.readouterr().out


def _templates(tmp_path: Path) -> Path:
    f = tmp_path / "templates.txt"
    f.write_text("\n".join(TEMPLATES) + "\n")
    return f


def test_draw_disk_sanity():
    assert draw_disk((10, 10), COLOURS["alice"]).getpixel((5, 5)) == COLOURS["alice"]


def test_curves_logged_to_wandb_offline(tmp_path, monkeypatch):
    from lumina_illus.evaluation.curves import log_curves_wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    pt = {"samples_seen": 100, "step": 1, "path": "x", "recall": 0.5, "ci95": [0.2, 0.8], "hits": 1, "n": 2,
          "per_bucket": {}}
    _, png = write_curves({"a": [pt], "b": [pt]}, tmp_path)
    dirs = log_curves_wandb({"a": [pt], "b": [pt]}, png, "proj", "offline", tmp_path)
    assert len(dirs) == 2
    for d in dirs:
        run_dir = Path(d).parent
        assert list(run_dir.glob("run-*.wandb")) and list(Path(d).glob("media/images/eval/char_recall_curve_*.png"))
