"""report.html of a char_recall evaluation: what a person looks at to see the knowledge arrive.

One self-contained HTML file (every picture embedded as a PNG data URI, so it can be mailed or opened
from any folder) with:
  - the recall curves (curve.png) and, per run, recall vs image samples seen by training-images bucket;
  - a table per run: recall per checkpoint and bucket;
  - per character: one of its training images (when an examples folder holds `<tag>.png|jpg|webp`)
    next to what the first, middle and last checkpoint of each run drew for the same prompt, size and
    seed (the first template, size and seed of the evaluation), with the tagger's verdict per image.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lumina_illus.evaluation.characters import Character
from lumina_illus.evaluation.plotting import pyplot, save_figure

EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
THUMB = 160  # pixels, longest side of every picture in the strips


def _data_uri(img: Image.Image, side: int = THUMB) -> str:
    img = img.convert("RGB")
    scale = side / max(img.size)
    if scale < 1 or max(img.size) < side // 2:  # small toy images are enlarged (nearest: pixels stay visible)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def example_image(folder: str | Path | None, character: Character) -> Image.Image | None:
    """`folder/<tag>.<ext>` (or `<name>.<ext>`), one of the character's training images; None if absent."""
    if folder is None:
        return None
    for stem in (character.tag, character.name):
        for suffix in EXAMPLE_SUFFIXES:
            p = Path(folder) / f"{stem}{suffix}"
            if p.is_file():
                return Image.open(p)
    return None


def plot_buckets(curves: Mapping[str, Sequence[Mapping[str, Any]]], out_png: Path) -> Path:
    """One panel per run: recall vs samples seen, one line per training-images bucket."""
    plt = pyplot()
    runs = [k for k, pts in curves.items() if any(p["samples_seen"] is not None for p in pts)]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(6 * max(1, len(runs)), 4), dpi=100, squeeze=False)
    for ax, label in zip(axes[0], runs):
        pts = sorted((p for p in curves[label] if p["samples_seen"] is not None), key=lambda p: p["samples_seen"])
        for bucket in pts[-1].get("per_bucket") or {}:
            xs = [p["samples_seen"] for p in pts if bucket in (p.get("per_bucket") or {})]
            ys = [p["per_bucket"][bucket] for p in pts if bucket in (p.get("per_bucket") or {})]
            ax.plot(xs, ys, marker="o", label=f"{bucket} training images")
        ax.set_title(label)
        ax.set_xlabel("image samples seen")
        ax.set_ylabel("character recall")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def _pick(points: Sequence[Any]) -> list[int]:
    """Indices of the first, middle and last checkpoint (fewer when there are fewer)."""
    n = len(points)
    return sorted({0, (n - 1) // 2, n - 1}) if n else []


def write_report(
    out_dir: str | Path,
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    evaluations: Mapping[str, Sequence[tuple[Mapping[str, Any], Mapping[str, Any], str]]],
    characters: Sequence[Character],
    image_of: Callable[[str, Character], Image.Image | None],
    examples: str | Path | None = None,
    title: str = "character recall",
) -> Path:
    """Write out_dir/report.html. `evaluations[run]` lists (checkpoint_info, evaluate() result, ckpt_id)
    in curve order; `image_of(ckpt_id, character)` returns the generated image shown for that checkpoint
    (from the evaluation's image cache). Returns the path."""
    out_dir = Path(out_dir)
    buckets_png = plot_buckets(curves, out_dir / "curve_buckets.png")
    h: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:center;vertical-align:top}",
        "img{image-rendering:pixelated}.hit{color:#080;font-weight:bold}.miss{color:#a00}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Recall vs image samples seen</h2>",
    ]
    if (out_dir / "curve.png").is_file():
        h.append(f"<img alt='recall curves' src='{_png_uri(out_dir / 'curve.png')}'>")
    h.append(f"<img alt='recall by training-images bucket' src='{_png_uri(buckets_png)}'>")
    for run, evals in evaluations.items():
        if not evals:
            continue
        labels = [b["label"] for b in evals[-1][1]["per_bucket"]]
        h.append(f"<h3>{html.escape(run)}</h3><table><tr><th>step</th><th>samples seen</th><th>recall</th>"
                 + "".join(f"<th>{html.escape(lb)} training images</th>" for lb in labels) + "</tr>")
        for info, result, _ in evals:
            per = {b["label"]: b["recall"] for b in result["per_bucket"]}
            h.append(f"<tr><td>{info['step']}</td><td>{info['samples_seen']}</td><td>{result['recall']:.3f}</td>"
                     + "".join(f"<td>{per.get(lb, float('nan')):.3f}</td>" for lb in labels) + "</tr>")
        h.append("</table>")
    h.append("<h2>Characters: a training image, then the first, middle and last checkpoint</h2>")
    for ci, ch in enumerate(characters):
        h.append(f"<h3>{html.escape(ch.name)} <small>({html.escape(ch.tag)}, {ch.train_samples} training images)"
                 "</small></h3><table><tr><th>training image</th>")
        cells = []
        ex = example_image(examples, ch)
        ex_cell = f"<img alt='training image' src='{_data_uri(ex)}'>" if ex is not None else "(no example)"
        for run, evals in evaluations.items():
            for k in _pick(evals):
                info, result, ckpt_id = evals[k]
                row = result["characters"][ci]
                img = image_of(ckpt_id, ch)
                verdict = f"<span class='{'hit' if row['recall'] > 0 else 'miss'}'>recall {row['recall']:.2f}</span>"
                pic = f"<img alt='{html.escape(run)} step {info['step']}' src='{_data_uri(img)}'>" if img else "(none)"
                h.append(f"<th>{html.escape(run)}<br>step {info['step']}, {info['samples_seen']} samples</th>")
                cells.append(f"<td>{pic}<br>{verdict}</td>")
        h.append(f"</tr><tr><td>{ex_cell}</td>{''.join(cells)}</tr></table>")
    h.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(h), encoding="utf-8")
    return path
