"""Binomial intervals and grouping of per-character results by training-sample count."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Edges of the train_samples buckets: [0,100), [100,500), [500,1000), [1000,2500), [2500,5000),
# [5000,10000), [10000, inf). The seed reports characters with ~2.5k samples learned after 22M samples.
DEFAULT_BUCKET_EDGES = (0, 100, 500, 1000, 2500, 5000, 10000)


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= hits <= n:
        raise ValueError(f"hits={hits} must be in [0, n={n}]")
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bucket_label(lo: int, hi: int | None) -> str:
    return f">={lo}" if hi is None else f"{lo}-{hi - 1}"


def bucket_of(train_samples: int, edges: Sequence[int] = DEFAULT_BUCKET_EDGES) -> tuple[int, int | None]:
    """(lo, hi) of the bucket holding train_samples: lo <= train_samples < hi; hi None for the last."""
    if list(edges) != sorted(set(edges)) or not edges:
        raise ValueError(f"bucket edges must be strictly increasing, got {list(edges)}")
    if train_samples < edges[0]:
        raise ValueError(f"train_samples={train_samples} is below the first bucket edge {edges[0]}")
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        if hi is None or train_samples < hi:
            return lo, hi
    raise AssertionError("unreachable")


def summarize(hits: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(hits, n)
    return {"hits": hits, "n": n, "recall": hits / n if n else 0.0, "ci95": [lo, hi]}


def group_by_buckets(
    per_character: Sequence[dict[str, Any]], edges: Sequence[int] = DEFAULT_BUCKET_EDGES
) -> list[dict[str, Any]]:
    """Pool per-character {"train_samples", "hits", "n"} into train_samples buckets (empty ones left out).

    Each bucket: label, lo, hi, characters (count), hits, n (images), recall (pooled hits/n), ci95
    (Wilson over the pooled images), mean_char_recall (mean of the characters' own recalls).
    """
    groups: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for c in per_character:
        groups.setdefault(bucket_of(int(c["train_samples"]), edges), []).append(c)
    out = []
    for (lo, hi), chars in sorted(groups.items()):
        hits = sum(c["hits"] for c in chars)
        n = sum(c["n"] for c in chars)
        out.append({
            "label": bucket_label(lo, hi), "lo": lo, "hi": hi, "characters": len(chars),
            **summarize(hits, n),
            "mean_char_recall": sum(c["hits"] / c["n"] for c in chars if c["n"]) / len(chars),
        })
    return out
