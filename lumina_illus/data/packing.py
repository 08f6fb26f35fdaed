"""Forming micro-batches from a stream of bucketed samples: pure functions and two small batchers.

"bucket" mode (SDXL): micro-batches of exactly `micro_batch` samples of one bucket.
"tokens" mode (DiT): mixed buckets packed up to `token_budget` image tokens (and at most
`micro_batch` samples); efficiency = packed tokens / budget.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


def pack_tokens(tokens: list[int], budget: int, max_samples: int) -> list[int]:
    """Indices (into `tokens`, the pending samples in arrival order) of one packed micro-batch.
    The oldest sample always goes first, so nothing waits forever; the rest is filled largest
    first with whatever still fits (first-fit decreasing)."""
    if not tokens:
        return []
    chosen, used = [0], tokens[0]
    for i in sorted(range(1, len(tokens)), key=lambda i: -tokens[i]):
        if len(chosen) >= max_samples:
            break
        if used + tokens[i] <= budget:
            chosen.append(i)
            used += tokens[i]
    return sorted(chosen)


class TokenPacker(Generic[T]):
    """Holds samples until enough are pending to fill a micro-batch well, then packs one."""

    def __init__(self, budget: int, max_samples: int, lookahead: float = 2.0):
        self.budget, self.max_samples = budget, max_samples
        self.lookahead = lookahead  # pack once pending tokens reach lookahead * budget
        self.pending: list[tuple[T, int]] = []

    def add(self, item: T, tokens: int) -> list[T] | None:
        if tokens > self.budget:
            raise ValueError(f"sample of {tokens} tokens exceeds token_budget {self.budget}")
        self.pending.append((item, tokens))
        if sum(t for _, t in self.pending) >= self.lookahead * self.budget or len(self.pending) >= 4 * self.max_samples:
            return self.pop()
        return None

    def pop(self) -> list[T]:
        idx = pack_tokens([t for _, t in self.pending], self.budget, self.max_samples)
        out = [self.pending[i][0] for i in idx]
        keep = set(idx)
        self.pending = [p for i, p in enumerate(self.pending) if i not in keep]
        return out


class BucketBatcher(Generic[T]):
    """Per-bucket queues; a queue that reaches `micro_batch` samples becomes a micro-batch."""

    def __init__(self, micro_batch: int):
        self.micro_batch = micro_batch
        self.queues: dict[Hashable, list[T]] = {}

    def add(self, item: T, bucket: Hashable) -> list[T] | None:
        q = self.queues.setdefault(bucket, [])
        q.append(item)
        if len(q) == self.micro_batch:
            del self.queues[bucket]
            return q
        return None
