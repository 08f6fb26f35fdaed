"""Recall vs image samples seen: curve points, PNG plot (matplotlib, Agg) and W&B logging."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lumina_illus.evaluation import metrics
from lumina_illus.evaluation.plotting import pyplot, save_figure


def curve_point(info: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """One point of the curve from checkpoint_info() and evaluate() output."""
    return {
        "samples_seen": info["samples_seen"], "step": info["step"], "path": info["path"],
        "flops_seen": info.get("flops_seen"), "train_seconds": info.get("train_seconds"),
        "recall": result["recall"], "ci95": list(result["ci95"]), "hits": result["hits"], "n": result["n"],
        "per_bucket": {b["label"]: b["recall"] for b in result["per_bucket"]},
        "per_size": {k: v["recall"] for k, v in result.get("per_size", {}).items()},
    }


# x axes of the curve: the point field and its label (a figure of merit per unit of what was spent)
X_AXES = {
    "samples": ("samples_seen", "image samples seen"),
    "flops": ("flops_seen", "training compute (model FLOPs, forward + backward)"),
    "hours": ("train_hours", "training wall-clock (hours of optimizer steps)"),
}


def x_value(point: Mapping[str, Any], axis: str) -> float | None:
    if axis == "hours":
        return None if point.get("train_seconds") is None else point["train_seconds"] / 3600
    return point.get(X_AXES[axis][0])


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], out_png: str | Path,
                title: str | None = None, x: str = "samples") -> Path:
    """One line per run (x = samples seen, y = recall, band = 95% Wilson interval), plus a dashed line in
    the same colour for the run's most frequent characters (its last training-images bucket): overall
    recall is dominated by the long tail, the frequent characters show first whether learning works.
    `x`: "samples", "flops" or "hours" (X_AXES); points without that value (checkpoints exported before
    it was recorded) are left out. Returns the path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)  # 800 x 500 px
    axis = x
    for label, pts in curves.items():
        pts = sorted((p for p in pts if x_value(p, axis) is not None), key=lambda p: x_value(p, axis))
        if not pts:
            continue
        x = [x_value(p, axis) for p in pts]
        (line,) = ax.plot(x, [p["recall"] for p in pts], marker="o", label=label)
        ax.fill_between(x, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], alpha=0.2)
        top = list(pts[-1].get("per_bucket") or {})[-1:]  # buckets are ordered by training images
        if top and all(top[0] in (p.get("per_bucket") or {}) for p in pts):
            ax.plot(x, [p["per_bucket"][top[0]] for p in pts], linestyle="--", marker=".", color=line.get_color(),
                    label=f"{label}: characters with {top[0]} training images")
    ax.set_xlabel(X_AXES[axis][1])
    if axis == "flops":
        ax.set_xscale("log")
    ax.set_ylabel("character recall")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"character recall vs {X_AXES[axis][1]}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return save_figure(fig, out_png)


def plot_sizes(curves: Mapping[str, Sequence[Mapping[str, Any]]], out_png: str | Path, x: str = "samples") -> Path:
    """Recall vs `x`, one line per generated size (marker per run): how far the resolution carries."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    markers = "osD^v<>"
    for r, (label, pts) in enumerate(curves.items()):
        pts = sorted((p for p in pts if x_value(p, x) is not None), key=lambda p: x_value(p, x))
        for size in (pts[-1].get("per_size") or {}) if pts else {}:
            sel = [p for p in pts if size in (p.get("per_size") or {})]
            ax.plot([x_value(p, x) for p in sel], [p["per_size"][size] for p in sel], marker=markers[r % len(markers)],
                    label=f"{label} {size}")
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel("character recall")
    ax.set_ylim(0, 1)
    ax.set_title("character recall per generated size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, out_png)


def write_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                 x: str = "samples", per_size: bool = False) -> tuple[Path, Path]:
    """curve.json + curve.png (x = samples seen) in out_dir; with x "flops" or "hours" also
    curve_<x>.png, returned as the picture."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "curve.json"
    js.write_text(json.dumps({k: list(v) for k, v in curves.items()}, indent=2))
    png = plot_curves(curves, out_dir / "curve.png")
    if x != "samples":
        png = plot_curves(curves, out_dir / f"curve_{x}.png", x=x)
    if per_size:
        plot_sizes(curves, out_dir / "curve_sizes.png", x=x)
    return js, png


def log_curves_wandb(curves: Mapping[str, Sequence[Mapping[str, Any]]], png: str | Path, project: str,
                     mode: str, out_dir: str | Path) -> list[str]:
    """One W&B eval run per curve (offline by default), x axis train/samples_seen; returns run dirs."""
    import wandb

    dirs = []
    for label, pts in curves.items():
        run = wandb.init(project=project, name=f"char_recall/{label}", job_type="eval", mode=mode,
                         dir=str(out_dir), reinit="create_new", config={"run": label})
        run.define_metric(metrics.SAMPLES_SEEN)
        run.define_metric(metrics.CHAR_RECALL, step_metric=metrics.SAMPLES_SEEN)
        for p in sorted((p for p in pts if p["samples_seen"] is not None), key=lambda p: p["samples_seen"]):
            run.log({metrics.SAMPLES_SEEN: p["samples_seen"], metrics.CHAR_RECALL: p["recall"],
                     f"{metrics.CHAR_RECALL}_lo": p["ci95"][0], f"{metrics.CHAR_RECALL}_hi": p["ci95"][1]})
        run.log({"eval/char_recall_curve": wandb.Image(str(png))})
        dirs.append(str(run.dir) if mode != "disabled" else "")
        run.finish()
    return dirs
