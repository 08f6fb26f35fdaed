"""RNG state of one rank as plain JSON data (Python, NumPy, torch CPU/CUDA, and our own generators),
so a resumed run draws exactly the same random numbers; no pickles in checkpoints."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _bytes(t: torch.Tensor) -> list[int]:
    return t.tolist()


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Snapshot of every RNG this rank uses; `generators` are named torch.Generator objects."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {k: _bytes(g.get_state()) for k, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore a `rng_state` snapshot (the same named generators must be passed)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    for k, gen in generators.items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {k!r}")
        gen.set_state(torch.tensor(state["generators"][k], dtype=torch.uint8))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
