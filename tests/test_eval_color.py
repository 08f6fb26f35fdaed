"""Colour statistics against hand-computed values and colorsys; failure flags on synthetic folders."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_illus.data.control import colorfulness
from lumina_illus.evaluation.color import failure_flags, folder_stats, image_stats

ROOT = Path(__file__).parents[1]


def test_image_stats_known_values():
    arr = np.zeros((4, 10, 3), np.uint8)
    arr[:, :6] = 255  # 60% pure white
    arr[:, 6:8] = (255, 0, 0)  # 20% pure red
    st = image_stats(Image.fromarray(arr))  # last 20% black
    assert st["white_frac"] == pytest.approx(0.6) and st["black_frac"] == pytest.approx(0.2)
    assert st["saturation_mean"] == pytest.approx(0.2 * 255)  # only red is saturated
    # Rec.601 luma: white 255, red 0.299 * 255
    assert st["brightness"] == pytest.approx(0.6 * 255 + 0.2 * 0.299 * 255)
    # colorfulness by hand: rg = R-G, yb = (R+G)/2 - B per pixel
    rg = np.array([0] * 6 + [255] * 2 + [0] * 2, float)
    yb = np.array([0] * 6 + [127.5] * 2 + [0] * 2, float)
    expect = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert st["colorfulness"] == pytest.approx(expect)
    assert colorfulness(np.full((3, 3, 3), 77, np.uint8)) == 0.0  # grey has no colour
    assert colorfulness(np.full((2, 2, 3), (255, 0, 0), np.uint8)) == pytest.approx(0.3 * np.hypot(255, 127.5))


def test_white_share_is_measured_at_full_resolution():
    arr = np.zeros((1024, 1024, 3), np.uint8)
    arr[::2] = 255  # every other row white: a resized thumbnail would blur this to grey
    assert image_stats(Image.fromarray(arr))["white_frac"] == 0.5


def test_saturation_matches_colorsys():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ref = np.array([[colorsys.rgb_to_hsv(*(px / 255.0))[1] * 255 for px in row] for row in rgb])  # (8, 8)
    st = image_stats(Image.fromarray(rgb))
    assert st["saturation_mean"] == pytest.approx(ref.mean(), abs=0.6)
    assert st["saturation_std"] == pytest.approx(ref.std(), abs=0.6)


def _folder(root: Path, n: int, white: float, colour: tuple[int, int, int]) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        arr = np.clip(rng.normal(colour, 20, (16, 16, 3)), 0, 254).astype(np.uint8)
        arr[: int(round(white * 16))] = 255
        Image.fromarray(arr).save(root / f"{i}.png")
    return root


def test_failure_flags_on_synthetic_folders(tmp_path):
    ref = folder_stats(_folder(tmp_path / "ref", 3, 0.125, (150, 120, 110)), progress=False)
    good = folder_stats(_folder(tmp_path / "good", 3, 0.125, (140, 125, 115)), progress=False)
    collapsed = folder_stats(_folder(tmp_path / "vpred", 3, 0.5625, (250, 20, 30)), progress=False)
    assert collapsed["images"] == 3 and collapsed["white_frac"] == pytest.approx(0.5625)
    assert failure_flags(good, ref) == {}
    flags = failure_flags(collapsed, ref)
    assert set(flags) == {"white_collapse", "oversaturation"} and "56.25%" in flags["white_collapse"]
    # the seed's number on its own, without a reference
    assert "white_collapse" in failure_flags({**good, "white_frac": 0.5846})


def test_cli_writes_json_and_exits_1_on_failure(tmp_path):
    _folder(tmp_path / "ref", 2, 0.125, (150, 120, 110))
    _folder(tmp_path / "vpred", 2, 0.625, (250, 20, 30))
    out = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval/color_stats.py"), str(tmp_path / "vpred"), "--reference",
                        str(tmp_path / "ref"), "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "FLAG white_collapse" in r.stdout
    data = json.loads(out.read_text())
    assert data["folder"]["white_frac"] == pytest.approx(0.625) and "per_image" not in data["folder"]


def test_cli_names_a_missing_folder_without_a_traceback(tmp_path):
    _folder(tmp_path / "ref", 2, 0.125, (150, 120, 110))
    r = subprocess.run([sys.executable, str(ROOT / "eval/color_stats.py"), str(tmp_path / "nowhere"), "--reference",
                        str(tmp_path / "ref"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and str(tmp_path / "nowhere") in r.stderr and "Traceback" not in r.stderr
