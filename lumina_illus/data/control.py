"""Colour statistics and the control tokens of the Illustrious v3.5 report.

Per image (computed on a copy resized to about `STATS_AREA` pixels, so that sharpness compares
across resolutions):
    brightness      mean luma (Rec. 601, 0..255)
    contrast        RMS contrast: standard deviation of luma
    sharpness       variance of the 4-neighbour Laplacian of luma
    dynamic_range   99th minus 1st percentile of luma
    colorfulness    Hasler & Suesstrunk (2003): sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2),
                    rg = R - G, yb = (R + G) / 2 - B
    saturation_mean, saturation_std   HSV saturation (0..255)
Each metric maps to 4 levels by the dataset's quartiles; the level names are the report's tokens.
The report's "colorful" rule: saturation above 120 with saturation std below 50.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

STATS_AREA = 512 * 512

# control group -> (metric it is computed from, the report's 4 token names, low to high)
CONTROL_TOKENS: dict[str, tuple[str, tuple[str, str, str, str]]] = {
    "contrast": ("contrast", ("low contrast", "medium contrast", "high contrast", "very high contrast")),
    "brightness": ("brightness", ("dark", "normal brightness", "bright", "very bright")),
    "sharpness": ("sharpness", ("blurry", "slightly sharp", "sharp", "very sharp")),
    "dynamic_colors": ("dynamic_range",
                       ("static colors", "medium dynamic colors", "high dynamic colors", "very dynamic colors")),
    "colorfulness": ("colorfulness",
                     ("monotonic color", "medium colorfulness", "high colorfulness", "very high colorfulness")),
    "saturation": ("saturation_mean", ("muted colors", "average colors", "vibrant colors", "very vibrant colors")),
}
METRICS = ("brightness", "contrast", "sharpness", "dynamic_range", "colorfulness", "saturation_mean",
           "saturation_std")


def _thumb(img: Image.Image) -> Image.Image:
    img = img.convert("RGB")
    scale = math.sqrt(STATS_AREA / (img.width * img.height))
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return img


def laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels of a (H, W) float array."""
    c = luma[1:-1, 1:-1]
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * c  # (H-2, W-2)
    return float(lap.var()) if lap.size else 0.0


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk colourfulness of an (H, W, 3) array in 0..255."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def color_stats(img: Image.Image) -> dict[str, float]:
    """The statistics of one (8-bit RGB-convertible) image; see module docstring."""
    img = _thumb(img)
    rgb = np.asarray(img, dtype=np.float64)  # (H, W, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # (H, W)
    sat = np.asarray(img.convert("HSV"), dtype=np.float64)[..., 1]  # (H, W)
    p1, p99 = np.percentile(luma, [1, 99])
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "sharpness": laplacian_variance(luma),
        "dynamic_range": float(p99 - p1),
        "colorfulness": colorfulness(rgb),
        "saturation_mean": float(sat.mean()),
        "saturation_std": float(sat.std()),
    }


def is_colorful(stats: dict[str, float], min_saturation: float = 120.0, max_saturation_std: float = 50.0) -> bool:
    """The report's rule: saturation above 120 with saturation standard deviation below 50."""
    return stats["saturation_mean"] > min_saturation and stats["saturation_std"] < max_saturation_std


def quartile_edges(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """metric -> its 25/50/75th percentiles over the dataset (the level boundaries)."""
    out = {}
    for m, vs in values.items():
        if not vs:
            raise ValueError(f"no values for metric {m!r}")
        out[m] = [float(x) for x in np.percentile(np.asarray(vs, dtype=np.float64), [25, 50, 75])]
    return out


def control_tokens(stats: dict[str, float], edges: dict[str, list[float]]) -> dict[str, str]:
    """control group -> token, level = number of quartile edges the value is above."""
    out = {}
    for group, (metric, names) in CONTROL_TOKENS.items():
        level = sum(stats[metric] > e for e in edges[metric])
        out[group] = names[level]
    return out
