"""Data health during training: the loader's counts of every rank, gathered each step with the
step statistics (telemetry.gather_stats), become the `data/*` metrics, and `SkipGuard` stops the run
when more than data.max_skip_fraction of the last data.skip_window samples were bad.

Every rank sees the same gathered totals, so every rank reaches the same verdict at the same step
and the stop (checkpoint first) is collective-safe.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch.distributed as dist

from lumina_illus.config import DataConfig
from lumina_illus.data.reasons import NOT_BAD, SHARD_ERRORS, SKIP_REASONS

# layout of the per-rank data vector appended to the step statistics (all summed over ranks)
DATA_FIELDS = (*(f"skipped/{r}" for r in SKIP_REASONS), *(f"shard_errors/{r}" for r in SHARD_ERRORS),
               "delivered", "tokens", "budget", "batches")


def data_vector(stats: dict[str, Any]) -> list[float]:
    """One rank's Loader.stats() -> the numbers summed over ranks (DATA_FIELDS order). Cumulative since
    step 0: after a resume rank 0 carries the counts loaded from the checkpoint."""
    return ([float(stats["skipped"].get(r, 0)) for r in SKIP_REASONS]
            + [float(stats["shard_errors"].get(r, 0)) for r in SHARD_ERRORS]
            + [float(stats["samples"]), float(stats["tokens"]), float(stats["budget"]), float(stats["batches"])])


def skipped_by_reason(data: dict[str, float]) -> dict[str, float]:
    return {r: data[f"skipped/{r}"] for r in SKIP_REASONS}


class TooManyBadSamples(RuntimeError):
    """More than data.max_skip_fraction of recent samples were bad (a checkpoint was written first)."""


class SkipGuard:
    """The bad share of the last `skip_window` samples (delivered + skipped, all ranks), from the
    cumulative gathered counts; `bucket_leftover` (drop_last by design) is not bad data."""

    def __init__(self, cfg: DataConfig) -> None:
        self.max_fraction, self.window = cfg.max_skip_fraction, cfg.skip_window
        self.points: deque[tuple[float, dict[str, float]]] = deque([(0.0, dict.fromkeys(SKIP_REASONS, 0.0))])
        self.fraction: float | None = None  # over the window (or all samples so far, while it fills)
        self.full = False  # at least `window` samples between the oldest point and now
        self.span = 0.0  # samples between the oldest point and now
        self.delta: dict[str, float] = {}  # bad samples per reason in that span

    def update(self, data: dict[str, float]) -> None:
        """Add the gathered totals of one step."""
        bad = skipped_by_reason(data)
        seen = data["delivered"] + sum(bad.values())
        self.points.append((seen, bad))
        # keep the newest point that is still at least a window back, and everything after it
        while len(self.points) > 2 and seen - self.points[1][0] >= self.window:
            self.points.popleft()
        old_seen, old_bad = self.points[0]
        span = seen - old_seen
        self.full = span >= self.window
        self.delta = {r: bad[r] - old_bad[r] for r in SKIP_REASONS if r not in NOT_BAD}
        self.span = span
        self.fraction = sum(self.delta.values()) / span if span > 0 else None

    def verdict(self) -> str | None:
        """None, or why the run must stop (the top reasons in the window)."""
        if not self.full or self.fraction is None or self.fraction <= self.max_fraction:
            return None
        top = sorted(((n, r) for r, n in self.delta.items() if n > 0), reverse=True)[:4]
        reasons = ", ".join(f"{r} {int(n)}" for n, r in top)
        return (f"data: {int(sum(self.delta.values()))} of the last {int(self.span)} samples were bad "
                f"({self.fraction:.2%} > data.max_skip_fraction={self.max_fraction:.2%}): {reasons}")


def examples(recent: list[str], world_size: int, k: int = 5) -> list[str]:
    """Collective: a few recent skips (reason, shard, key, message) from every rank, for the stop message."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, recent[-k:])
        recent = [x for p in parts for x in p]
    return recent[-2 * k:]
