"""Unit tests of the data pipeline's pure parts: buckets, decoding, captions, control statistics,
packing and the cursor."""

from __future__ import annotations

import colorsys
import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import ndimage

from lumina_illus.config import ConfigError, DataConfig, from_dict
from lumina_illus.data.buckets import (
    all_buckets,
    area_levels,
    assign_bucket,
    image_tokens,
    level_buckets,
    resize_and_crop,
)
from lumina_illus.data.captions import CaptionConfig, CaptionError, build_caption
from lumina_illus.data.control import (
    CONTROL_TOKENS,
    color_stats,
    colorfulness,
    control_tokens,
    is_colorful,
    laplacian_variance,
    quartile_edges,
)
from lumina_illus.data.cursor import Cursor, from_ranges, merge_states, shard_order, to_ranges
from lumina_illus.data.decode import DecodeError, load_rgb, open_image, to_tensor
from lumina_illus.data.packing import BucketBatcher, TokenPacker, pack_tokens

# ---------------------------------------------------------------- buckets


def test_buckets_cover_256_to_2048_with_sides_multiple_of_64_and_aspect_4() -> None:
    cfg = DataConfig(min_area=256**2, max_area=2048**2, token_budget=16384)
    levels = area_levels(cfg)
    assert levels[0] == 256**2 and levels[-1] == 2048**2
    for area in levels:
        bs = level_buckets(cfg, area)
        assert (math.isqrt(area), math.isqrt(area)) in bs  # the square bucket of every level
        for h, w in bs:
            assert h % 64 == 0 and w % 64 == 0 and h * w <= area and max(h / w, w / h) <= 4
    assert len(all_buckets(cfg)) > 50


def test_assign_bucket_is_nearest_aspect_at_the_images_area_level() -> None:
    cfg = DataConfig()  # 256^2 .. 1024^2
    assert assign_bucket(cfg, 1024, 1024) == (1024, 1024)
    assert assign_bucket(cfg, 3000, 3000) == (1024, 1024)  # large images go to the target area
    assert assign_bucket(cfg, 300, 300) == (256, 256)  # small ones are not upscaled to 1024^2
    assert assign_bucket(cfg, 832, 1216) == (832, 1216)  # an SDXL-size image stays at the 1024^2 level
    assert assign_bucket(cfg, 600, 600) == (512, 512)  # nearest level in log-area (512^2, not 768^2)
    h, w = 1000, 2000
    b = assign_bucket(cfg, h, w)
    best = min(level_buckets(cfg, 1024**2), key=lambda x: abs(math.log(x[1] / x[0]) - math.log(2)))
    assert b == best and b[1] > b[0]
    assert image_tokens(cfg, (1024, 1024)) == 64 * 64


def test_resize_and_crop_records_the_crop_and_matches_pil_reference() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out, (top, left) = resize_and_crop(img, (128, 192))
    assert out.size == (192, 128)
    scale = max(192 / 500, 128 / 300)
    rw, rh = round(500 * scale), round(300 * scale)
    ref = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    assert (top, left) == ((rh - 128) // 2, (rw - 192) // 2)
    assert np.array_equal(np.asarray(out), np.asarray(ref.crop((left, top, left + 192, top + 128))))
    _, (t2, l2) = resize_and_crop(img, (128, 192), random.Random(1))
    assert 0 <= t2 <= rh - 128 and 0 <= l2 <= rw - 192


# ---------------------------------------------------------------- decoding


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    img, _, _ = open_image(data)
    return load_rgb(img)


def test_exif_orientation_is_applied_and_reported_in_the_size() -> None:
    a = np.zeros((40, 80, 3), dtype=np.uint8)
    a[:, :40] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _bytes(img, "JPEG", exif=exif, quality=95)
    _, h, w = open_image(data)
    assert (h, w) == (80, 40)
    out = _decode(data)
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert out.size == (40, 80) and np.array_equal(np.asarray(out), np.asarray(ref))


def test_modes_grayscale_palette_cmyk_16bit_and_alpha_on_white() -> None:
    gray = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), "L")
    assert np.asarray(_decode(_bytes(gray, "PNG")))[0, 0].tolist() == [100, 100, 100]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(_decode(_bytes(pal, "PNG")))[0, 0].tolist() == [10, 20, 30]
    pal.info["transparency"] = 1  # palette index 1 transparent -> white
    assert np.asarray(_decode(_bytes(pal, "PNG", transparency=1)))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = np.asarray(_decode(_bytes(cmyk, "JPEG", quality=100)))[0, 0].tolist()
    assert r > 240 and g < 15 and b < 15
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))  # 16-bit gray, full scale
    deep_bytes = _bytes(deep, "PNG")
    assert Image.open(io.BytesIO(deep_bytes)).mode.startswith("I")
    assert np.asarray(_decode(deep_bytes))[0, 0].tolist() == [255, 255, 255]
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:, 3] = 128  # right half half-transparent red over white
    out = np.asarray(_decode(_bytes(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 7, 0] == 255 and abs(int(out[0, 7, 1]) - 127) <= 1
    la = Image.fromarray(np.stack([np.zeros((8, 8)), np.zeros((8, 8))], -1).astype(np.uint8), "LA")
    assert np.asarray(_decode(_bytes(la, "PNG")))[0, 0].tolist() == [255, 255, 255]
    t = to_tensor(_decode(_bytes(gray, "PNG")))
    assert t.shape == (3, 8, 8) and abs(t[0, 0, 0].item() - (100 / 127.5 - 1)) < 1e-6


def test_bad_bytes_give_reasons() -> None:
    with pytest.raises(DecodeError) as e:
        open_image(b"")
    assert e.value.reason == "empty_file"
    with pytest.raises(DecodeError) as e:
        open_image(b"not an image" * 10)
    assert e.value.reason == "corrupt_image"


# ---------------------------------------------------------------- captions

META = {"tags": {"general": ["long_hair", "smile", "blue_eyes", "^_^"], "character": ["hatsune_miku"],
                 "copyright": ["vocaloid"], "artist": ["some_artist"]},
        "control": {"contrast": "high contrast", "saturation": "muted colors"}}


def test_caption_order_kept_rest_shuffled_underscores_and_control_tokens() -> None:
    cfg = CaptionConfig(caption_dropout=0.0, nl_prob=0.0)
    seen_orders = set()
    for seed in range(20):
        parts = build_caption(cfg, None, META, random.Random(seed)).split(", ")
        assert parts[:2] == ["hatsune miku", "vocaloid"]
        assert set(parts[2:]) == {"long hair", "smile", "blue eyes", "^_^", "some artist", "high contrast",
                                  "muted colors"}
        seen_orders.add(tuple(parts[2:]))
    assert len(seen_orders) > 5  # the rest is really shuffled


def test_caption_dropouts_and_natural_language_mixing() -> None:
    assert build_caption(CaptionConfig(caption_dropout=1.0), "text", META, random.Random(0)) == ""
    only_head = build_caption(CaptionConfig(caption_dropout=0.0, tag_dropout=1.0, control_dropout=1.0, nl_prob=0.0),
                              None, META, random.Random(0))
    assert only_head == "hatsune miku, vocaloid"
    nl = "A girl with long teal twin tails. " * 60  # ~500 tokens: passes through untouched
    c = build_caption(CaptionConfig(caption_dropout=0.0, nl_prob=1.0, control_tokens=False), nl, META,
                      random.Random(0))
    assert c == nl.strip()
    both = build_caption(CaptionConfig(caption_dropout=0.0, nl_prob=0.0, nl_and_tags_prob=1.0), "A girl.", META,
                         random.Random(0))
    assert both.startswith("hatsune miku, vocaloid, ") and both.endswith(". A girl.")
    rng = random.Random(0)
    kinds = [build_caption(CaptionConfig(caption_dropout=0.0, nl_prob=0.3), "A girl.", META, rng) for _ in range(2000)]
    frac = sum(k.startswith("A girl.") for k in kinds) / len(kinds)
    assert abs(frac - 0.3) < 0.04
    with pytest.raises(CaptionError):
        build_caption(CaptionConfig(), None, {"tags": {}}, random.Random(0))


def test_caption_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="caption.tag_dropot"):
        DataConfig(caption={"tag_dropot": 0.5})
    with pytest.raises(ConfigError, match="tag_dropout"):
        from_dict(CaptionConfig, {"tag_dropout": 2.0}, where="x.yaml")


# ---------------------------------------------------------------- control statistics


def test_colorfulness_laplacian_and_saturation_match_their_definitions() -> None:
    red = np.zeros((16, 16, 3))
    red[..., 0] = 255
    # Hasler-Suesstrunk on a flat red: stds 0, means rg=255, yb=127.5
    assert colorfulness(red) == pytest.approx(0.3 * math.hypot(255, 127.5))
    assert colorfulness(np.full((16, 16, 3), 128.0)) == 0.0
    rng = np.random.default_rng(0)
    luma = rng.random((32, 32)) * 255
    ref = ndimage.laplace(luma)[1:-1, 1:-1].var()
    assert laplacian_variance(luma) == pytest.approx(ref)
    pix = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    s = color_stats(Image.fromarray(pix))
    sat = np.array([colorsys.rgb_to_hsv(*(p / 255.0))[1] * 255 for p in pix.reshape(-1, 3)])
    assert s["saturation_mean"] == pytest.approx(sat.mean(), abs=1.0)  # PIL quantises S to 0..255
    luma_ref = pix.astype(float) @ [0.299, 0.587, 0.114]
    assert s["brightness"] == pytest.approx(luma_ref.mean()) and s["contrast"] == pytest.approx(luma_ref.std())
    assert is_colorful(color_stats(Image.fromarray(red.astype(np.uint8))))
    assert not is_colorful(color_stats(Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8))))


def test_quartile_levels_split_the_dataset_in_four() -> None:
    metrics = {m for m, _ in CONTROL_TOKENS.values()}
    values = {m: list(range(100)) for m in metrics}
    edges = quartile_edges(values)
    counts: dict[str, int] = {}
    for v in range(100):
        tok = control_tokens(dict.fromkeys(metrics, float(v)), edges)["saturation"]
        counts[tok] = counts.get(tok, 0) + 1
    assert counts == {"muted colors": 25, "average colors": 25, "vibrant colors": 25, "very vibrant colors": 25}


# ---------------------------------------------------------------- packing and cursor


def test_pack_tokens_oldest_first_within_budget() -> None:
    assert pack_tokens([3, 5, 4, 2], budget=8, max_samples=4) == [0, 1]
    assert pack_tokens([6, 5, 4, 2], budget=8, max_samples=4) == [0, 3]
    assert pack_tokens([1, 1, 1, 1], budget=8, max_samples=2) == [0, 1]
    p = TokenPacker(budget=10, max_samples=8)
    out = [b for i, t in enumerate([4, 4, 6, 3, 3, 5, 5, 2, 8]) if (b := p.add(i, t))]
    assert all(sum([4, 4, 6, 3, 3, 5, 5, 2, 8][i] for i in b) <= 10 for b in out) and out
    with pytest.raises(ValueError, match="exceeds token_budget"):
        p.add(99, 11)
    bb = BucketBatcher(2)
    assert bb.add("a", (64, 64)) is None and bb.add("b", (64, 128)) is None and bb.add("c", (64, 64)) == ["a", "c"]


def test_cursor_ranges_merge_and_redeal() -> None:
    xs = {0, 1, 2, 5, 9, 10}
    assert from_ranges(to_ranges(xs)) == xs and to_ranges(xs) == [[0, 3], [5, 6], [9, 11]]
    assert sorted(shard_order(5, 0, 1)) == list(range(5)) and shard_order(5, 0, 1) == shard_order(5, 0, 1)
    a, b = Cursor(4, 0, "f"), Cursor(4, 0, "f")
    order = shard_order(4, 0, 0)
    for i in range(3):
        a.mark(0, order[0], i)
    a.set_total(0, order[0], 3)  # shard fully consumed
    b.mark(0, order[1], 1)  # one sample of another shard
    m = Cursor.from_state(merge_states([{"cursor": a.state_dict()}, {"cursor": b.state_dict()}])["cursor"])
    items = list(zip(range(4), m.work()))
    assert [(w.epoch, w.shard) for _, w in items[:3]] == [(0, order[1]), (0, order[2]), (0, order[3])]
    assert items[0][1].skip == {1} and items[3][1].epoch == 1
    # a stale partial record (another rank's shard, loaded from an older merged state) disappears
    # once the owner reports the shard done
    stale = Cursor(4, 0, "f")
    stale.mark(0, order[0], 0)
    m2 = merge_states([{"cursor": a.state_dict()}, {"cursor": stale.state_dict()}])["cursor"]
    assert m2["epochs"]["0"]["done"] == [order[0]] and m2["epochs"]["0"]["partial"] == {}
    with pytest.raises(ValueError, match="different data"):
        merge_states([{"cursor": a.state_dict()}, {"cursor": Cursor(5, 0, "g").state_dict()}])


def test_data_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="token_budget"):
        DataConfig(max_area=1024**2, token_budget=1000)  # one 1024^2 image is 4096 tokens
    with pytest.raises(ValueError, match="skip_aspect"):
        DataConfig(max_aspect=4.0, skip_aspect=3.0)
    with pytest.raises(ValueError, match="bucket_step"):
        DataConfig(bucket_step=40)
