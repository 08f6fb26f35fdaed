"""Denoising spectra: how low- and high-frequency energy evolve over the sampling steps.

The seed's analysis of v-prediction collapse: sample a near-empty prompt ("empty black background") in
few steps, decode every intermediate latent x_t and every clean prediction x0, and compare the radially
averaged FFT power spectra step by step. A model that "fixes" colours in the first step shows its
low-frequency (DC + coarse) energy settling immediately, while the mid steps invent high frequencies.

    result = denoise_spectra(generator, "empty black background", (1024, 1024), seed=0, steps=10, guidance=4.0)
    plot_spectra(result, "denoise_fft.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumina_illus.evaluation.plotting import pyplot, save_figure
from lumina_illus.families import Generator

DEFAULT_CUTOFF = 1 / 32  # cycles per pixel between "low" and "high" (periods longer than 32 px are low)


def power_spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) or (C, H, W) array -> (P, r): power |F|^2 / (H W) per frequency, averaged over channels,
    and the radial frequency (cycles/pixel) of each entry; sum(P) == mean over channels of sum(x^2)."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    _, h, w = x.shape
    f = np.fft.fft2(x, axes=(-2, -1))  # (C, H, W) complex
    p = (np.abs(f) ** 2).mean(0) / (h * w)  # (H, W): Parseval-normalised power
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")  # (H, W) cycles/pixel
    return p, np.sqrt(fx**2 + fy**2)


def radial_profile(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum: (freqs, mean power) over rings of width 1/min(H, W) up to 0.5."""
    p, r = power_spectrum(x)
    n = min(p.shape)
    ring = np.rint(r * n).astype(int)  # (H, W) ring index
    keep = ring <= n // 2  # corners beyond Nyquist on the short side are left out of the profile
    total = np.bincount(ring[keep], weights=p[keep], minlength=n // 2 + 1)
    count = np.bincount(ring[keep], minlength=n // 2 + 1)
    return np.arange(n // 2 + 1) / n, total / np.maximum(count, 1)


def band_energy(x: np.ndarray, cutoff: float = DEFAULT_CUTOFF) -> dict[str, float]:
    """Power in three bands: dc (mean colour), low (0 < f < cutoff), high (f >= cutoff); they sum to
    the total energy sum(x^2) (per channel, averaged over channels)."""
    p, r = power_spectrum(x)
    return {"dc": float(p[r == 0].sum()), "low": float(p[(r > 0) & (r < cutoff)].sum()),
            "high": float(p[r >= cutoff].sum())}


def _luma(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), np.float64) / 255.0  # (H, W) in [0, 1]


def _spectra(x: np.ndarray, cutoff: float) -> dict[str, Any]:
    freqs, prof = radial_profile(x)
    return {**band_energy(x, cutoff), "radial": prof.tolist(), "freqs": freqs.tolist()}


def denoise_spectra(
    generator: Generator, prompt: str, size: tuple[int, int], seed: int, steps: int, guidance: float,
    cutoff: float = DEFAULT_CUTOFF, frames_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run one sampling trajectory and measure, per step, the spectra of the decoded x_t and x0 images
    (luma in [0, 1]) and of the latents themselves (channel-averaged). Decoded frames are saved as
    frames_dir/x_XX.png and x0_XX.png when frames_dir is given."""
    traj = generator.trajectory(prompt, size, seed, steps, guidance)
    if frames_dir is not None:
        frames_dir = Path(frames_dir)
        frames_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, st in enumerate(traj):
        row: dict[str, Any] = {"step": i, "t": float(st["t"])}
        for k in ("x", "x0"):
            lat = st[k].detach().float().cpu() if isinstance(st[k], torch.Tensor) else torch.as_tensor(st[k])
            img = generator.decode(lat)
            if frames_dir is not None:
                img.save(frames_dir / f"{k}_{i:02d}.png")
            row[k] = _spectra(_luma(img), cutoff)  # decoded image
            row[f"latent_{k}"] = _spectra(lat.numpy(), cutoff)  # (C, h, w) latents
        rows.append(row)
    return {"prompt": prompt, "size": list(size), "seed": seed, "steps": steps, "guidance": guidance,
            "cutoff": cutoff, "trajectory": rows}


def plot_spectra(result: dict[str, Any], out_png: str | Path) -> Path:
    """Left: low/high-frequency (and DC) energy of decoded x_t and x0 over the steps (log scale).
    Right: radially averaged spectra of the decoded x0 per step (colour = step)."""
    plt = pyplot()
    rows = result["trajectory"]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)  # 1200 x 450 px
    for k, style in (("x", "-"), ("x0", "--")):
        for band, colour in (("dc", "k"), ("low", "tab:blue"), ("high", "tab:red")):
            a.plot(steps, [max(r[k][band], 1e-12) for r in rows], style, color=colour, marker="o", label=f"{k} {band}")
    a.set_yscale("log")
    a.set_xlabel("sampling step")
    a.set_ylabel(f"energy (cutoff {result['cutoff']:.3g} cycles/px)")
    a.set_title(f"{result['prompt'][:40]!r}: band energy per step")
    a.legend(fontsize=7, ncol=2)
    cmap = plt.get_cmap("viridis")
    for r in rows:
        f, p = np.array(r["x0"]["freqs"][1:]), np.array(r["x0"]["radial"][1:])
        b.loglog(f, np.maximum(p, 1e-16), color=cmap(r["step"] / max(1, len(rows) - 1)), label=f"step {r['step']}")
    b.axvline(result["cutoff"], color="grey", ls=":")
    b.set_xlabel("frequency (cycles/px)")
    b.set_ylabel("radial power of decoded x0")
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out_png)
