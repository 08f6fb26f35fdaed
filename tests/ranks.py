"""Run a test body on several real CPU ranks (torch.multiprocessing, gloo) and get rank 0's results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def spawn_ranks(worker: Callable[..., None], world: int = 2) -> dict[str, Any]:
    """Run `worker(rank, world, master_port, result)` in `world` processes; `result` is a shared dict the
    workers fill (conventionally rank 0). Raises if any rank fails."""
    from lumina_illus.train.engine import _free_port

    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(worker, args=(world, _free_port(), result), nprocs=world, join=True)
        return dict(result)
