"""On-disk cache of generated images, keyed by everything that determines the pixels.

Key = (checkpoint id, prompt, negative prompt, size, seed, steps, guidance); a re-run of an evaluation
loads what exists and generates only what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image


def checkpoint_id(path: str | Path) -> str:
    """Stable id of an exported checkpoint: its resolved path plus the modification time of its
    metadata (meta.json) or file, so a checkpoint rewritten in place is not served stale images."""
    p = Path(path).resolve()
    stamp = p / "meta.json" if p.is_dir() and (p / "meta.json").is_file() else p
    return f"{p}@{stamp.stat().st_mtime_ns}"


def image_key(
    ckpt: str, prompt: str, negative_prompt: str, size: tuple[int, int], seed: int,
    steps: int | None, guidance: float | None,
) -> str:
    spec = {"ckpt": ckpt, "prompt": prompt, "neg": negative_prompt, "w": size[0], "h": size[1],
            "seed": seed, "steps": steps, "guidance": guidance}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class ImageCache:
    """PNG files under root/<key[:2]>/<key>.png, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> Image.Image | None:
        p = self._path(key)
        if not p.is_file():
            return None
        with Image.open(p) as im:
            return im.convert("RGB")

    def put(self, key: str, image: Image.Image) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}.png")
        image.save(tmp)
        os.replace(tmp, p)  # atomic: a killed run never leaves a half-written image behind
