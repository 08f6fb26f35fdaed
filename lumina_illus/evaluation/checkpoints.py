"""Finding exported checkpoints: one file, one ckpt/step_X folder, a ckpt folder or a run folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lumina_illus.families import read_metadata

_STEP = re.compile(r"step_(\d+)$")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def _step_folders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and _STEP.search(p.name) and (p / "meta.json").is_file()]


def find_checkpoints(path: str | Path) -> list[Path]:
    """Exported checkpoints under `path`, ordered by samples seen (then step).

    Accepts an exported weights file, a ckpt/step_X folder (holding meta.json), a ckpt folder holding
    step_X folders, or a run folder holding ckpt/. Step folders without meta.json (a resume state
    still being written) are ignored.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{p}: not a checkpoint file (expected one of {WEIGHT_SUFFIXES})")
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint file or folder")
    if (p / "meta.json").is_file():
        return [p]
    found = _step_folders(p)
    if not found and (p / "ckpt").is_dir():
        found = _step_folders(p / "ckpt")
    if not found:
        raise ValueError(
            f"{p}: holds no exported checkpoint (expected meta.json, step_X/meta.json or ckpt/step_X/meta.json)"
        )
    infos = {f: checkpoint_info(f) for f in found}
    return sorted(found, key=lambda f: (infos[f]["samples_seen"] or 0, infos[f]["step"] or 0, f.name))


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """{"path", "family", "step", "samples_seen", "flops_seen", "train_seconds", "run"} from the checkpoint's
    metadata (None if absent)."""
    p = Path(path)
    meta = read_metadata(p)
    step = meta.get("step")
    if step is None:
        m = _STEP.search(p.name)
        step = int(m.group(1)) if m else None
    run = meta.get("run")
    if run is None:  # runs/<name>/ckpt/step_X -> <name>
        run = p.parent.parent.name if p.parent.name == "ckpt" else p.parent.name
    return {"path": str(p), "family": meta.get("family"), "step": step,
            "samples_seen": meta.get("samples_seen"), "flops_seen": meta.get("flops_seen"),
            "train_seconds": meta.get("train_seconds"), "run": run}
