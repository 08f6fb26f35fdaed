"""Radial FFT spectra against Parseval and pure sinusoids; the denoising analysis on a generator whose
trajectory is known (exact flow from noise to a black target)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_toys import ShapeGenerator

from lumina_illus.evaluation.spectrum import (
    band_energy,
    denoise_spectra,
    plot_spectra,
    power_spectrum,
    radial_profile,
)


def test_parseval_and_bands_sum_to_total():
    x = np.random.default_rng(0).normal(size=(3, 24, 40))
    p, r = power_spectrum(x)
    assert p.sum() == pytest.approx((x**2).sum() / 3)
    e = band_energy(x, cutoff=0.1)
    assert e["dc"] + e["low"] + e["high"] == pytest.approx((x**2).sum() / 3)
    assert e["dc"] == pytest.approx((x.mean(axis=(1, 2)) ** 2).mean() * 24 * 40)


def test_sinusoid_peaks_at_its_frequency():
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    wave = np.cos(2 * np.pi * 8 / n * xx) + 0.5 * np.cos(2 * np.pi * 20 / n * yy)  # 0.125 and 0.3125 cycles/px
    freqs, prof = radial_profile(wave)
    assert len(freqs) == n // 2 + 1 and freqs[-1] == 0.5
    top2 = sorted(np.argsort(prof)[-2:])
    assert [freqs[i] for i in top2] == [0.125, 0.3125]
    e = band_energy(wave, cutoff=0.2)
    # cos amplitude a over N^2 pixels carries a^2 N^2 / 2 of energy
    assert e["low"] == pytest.approx(n * n / 2) and e["high"] == pytest.approx(0.25 * n * n / 2)
    assert e["dc"] == pytest.approx(0, abs=1e-9)


def test_denoise_spectra_on_known_trajectory(tmp_path):
    res = denoise_spectra(ShapeGenerator(lambda *a: True), "empty black background", (48, 32), seed=0, steps=5,
                          guidance=1.0, cutoff=1 / 16, frames_dir=tmp_path / "frames")
    rows = res["trajectory"]
    assert [r["t"] for r in rows] == [0, 0.2, 0.4, 0.6, 0.8]
    # x_t goes from noise to the black target: its high-frequency energy falls at every step
    high = [r["x"]["high"] for r in rows]
    assert all(a > b for a, b in zip(high, high[1:]))
    assert [r["latent_x"]["high"] for r in rows] == sorted((r["latent_x"]["high"] for r in rows), reverse=True)
    # x0 is the same target at every step
    assert len({round(r["x0"]["high"], 12) for r in rows}) == 1
    target = np.asarray(Image.open(tmp_path / "frames" / "x0_04.png").convert("L"), float) / 255
    assert rows[0]["x0"]["high"] == pytest.approx(band_energy(target, 1 / 16)["high"])
    png = plot_spectra(res, tmp_path / "spec.png")
    assert Image.open(png).size == (1200, 450)


def test_cli_run_writes_json_png_per_guidance(tmp_path):
    spec = importlib.util.spec_from_file_location("denoise_fft_cli", Path(__file__).parents[1] / "eval/denoise_fft.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    paths = cli.run(ShapeGenerator(lambda *a: True), tmp_path, "empty black background", (32, 32), 0, 3, [4.0, 1.0],
                    1 / 16)
    assert [p.parent.name for p in paths] == ["g4", "g1"]
    for p in paths:
        assert len(json.loads(p.read_text())["trajectory"]) == 3 and (p.parent / "denoise_fft.png").is_file()
        assert len(list((p.parent / "frames").glob("*.png"))) == 6
