"""The global sample cursor: which samples of which epoch have been handed to the trainer.

The data order is defined independently of the world size. Epoch e visits the shards in a seeded
permutation; the infinite sequence of work items (epoch, shard) is dealt round-robin to the
consumers (rank x worker). A shard belongs to one consumer, so the cursor records, per epoch and
shard, the set of consumed sample ordinals (as ranges) and, once its end was read, its size. On
restart, done shards are skipped, partly consumed shards are re-read skipping what was consumed,
and the remaining items are dealt to however many consumers there now are: no sample of an epoch
is repeated or skipped, whatever the world size before and after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATE_VERSION = 1


def to_ranges(xs: set[int]) -> list[list[int]]:
    """{0,1,2,5} -> [[0,3],[5,6]] (half-open), the compact form stored in checkpoints."""
    out: list[list[int]] = []
    for x in sorted(xs):
        if out and out[-1][1] == x:
            out[-1][1] = x + 1
        else:
            out.append([x, x + 1])
    return out


def from_ranges(rs: list[list[int]]) -> set[int]:
    return {x for a, b in rs for x in range(a, b)}


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def fingerprint(urls: list[str]) -> str:
    return hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]


@dataclass
class WorkItem:
    epoch: int
    shard: int  # index into the url list
    skip: frozenset[int]  # sample ordinals already consumed


@dataclass
class Cursor:
    num_shards: int
    seed: int
    urls_fingerprint: str = ""
    consumed: dict[tuple[int, int], set[int]] = field(default_factory=dict)  # (epoch, shard) -> ordinals
    totals: dict[tuple[int, int], int] = field(default_factory=dict)  # (epoch, shard) -> samples in it
    done: dict[int, set[int]] = field(default_factory=dict)  # epoch -> fully consumed shards
    samples_seen: int = 0  # samples handed to the trainer (this rank's share until merged)
    base_epoch: int = 0  # the oldest epoch with samples not yet consumed; older ones need no record

    # ---- bookkeeping

    def mark(self, epoch: int, shard: int, ordinal: int) -> None:
        self.consumed.setdefault((epoch, shard), set()).add(ordinal)
        self._maybe_done(epoch, shard)

    def set_total(self, epoch: int, shard: int, n: int) -> None:
        self.totals[(epoch, shard)] = n
        self._maybe_done(epoch, shard)

    def _maybe_done(self, epoch: int, shard: int) -> None:
        n = self.totals.get((epoch, shard))
        if n is not None and len(self.consumed.get((epoch, shard), ())) >= n:
            self.done.setdefault(epoch, set()).add(shard)
            self.consumed.pop((epoch, shard), None)
            self.totals.pop((epoch, shard), None)
        # epochs whose every shard is done need no record beyond the epoch counter (only a merged,
        # global cursor sees every shard; a rank's own cursor keeps its per-epoch done lists)
        while self.num_shards and len(self.done.get(self.base_epoch, ())) == self.num_shards:
            self.done.pop(self.base_epoch)
            self.base_epoch += 1

    def compact(self) -> None:
        """Forget per-sample records of done shards and finished epochs (a rank that loaded a merged
        state still holds other ranks' partial shards; once their owners finish them, they go)."""
        for table in (self.consumed, self.totals):
            for e, s in list(table):
                if e < self.base_epoch or s in self.done.get(e, ()):
                    del table[(e, s)]
        for e in [e for e in self.done if e < self.base_epoch]:
            del self.done[e]

    # ---- the data order

    def work(self) -> Iterator[WorkItem]:
        """Infinite sequence of remaining work items, oldest epoch first."""
        e = self.base_epoch
        while True:
            done = self.done.get(e, set())
            for s in shard_order(self.num_shards, self.seed, e):
                if s not in done:
                    yield WorkItem(e, s, frozenset(self.consumed.get((e, s), ())))
            e += 1

    # ---- checkpoint form

    def state_dict(self) -> dict[str, Any]:
        epochs: dict[str, Any] = {}
        for e, shards in self.done.items():
            epochs.setdefault(str(e), {"done": [], "partial": {}})["done"] = sorted(shards)
        for (e, s), xs in self.consumed.items():
            ep = epochs.setdefault(str(e), {"done": [], "partial": {}})
            ep["partial"][str(s)] = {"consumed": to_ranges(xs), "total": self.totals.get((e, s))}
        for (e, s), n in self.totals.items():
            if (e, s) not in self.consumed:
                ep = epochs.setdefault(str(e), {"done": [], "partial": {}})
                ep["partial"][str(s)] = {"consumed": [], "total": n}
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_shards": self.num_shards,
            "urls_fingerprint": self.urls_fingerprint,
            "epoch": self.base_epoch,
            "samples_seen": self.samples_seen,
            "epochs": epochs,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Cursor:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: version {d.get('version')!r}, expected {STATE_VERSION}")
        c = cls(num_shards=d["num_shards"], seed=d["seed"], urls_fingerprint=d["urls_fingerprint"])
        c.base_epoch = d["epoch"]
        c.samples_seen = d["samples_seen"]
        for es, ep in d["epochs"].items():
            e = int(es)
            for s in ep["done"]:
                c.done.setdefault(e, set()).add(int(s))
            for ss, p in ep["partial"].items():
                xs = from_ranges(p["consumed"])
                if xs:
                    c.consumed[(e, int(ss))] = xs
                if p["total"] is not None:
                    c.totals[(e, int(ss))] = p["total"]
        for key in list(c.totals) + list(c.consumed):
            c._maybe_done(*key)
        return c


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of per-rank cursor states (each shard belongs to one rank, so the parts are disjoint)
    plus summed counters: the one global state every rank can load, whatever the new world size."""
    if not states:
        raise ValueError("merge_states: no states")
    first = states[0]["cursor"]
    for s in states[1:]:
        c = s["cursor"]
        if (c["seed"], c["num_shards"], c["urls_fingerprint"]) != (
            first["seed"], first["num_shards"], first["urls_fingerprint"]):
            raise ValueError("merge_states: states come from different data configurations")
    merged = Cursor(first["num_shards"], first["seed"], first["urls_fingerprint"])
    merged.base_epoch = min(s["cursor"]["epoch"] for s in states)
    for s in states:
        c = Cursor.from_state(s["cursor"])
        merged.samples_seen += c.samples_seen
        # epochs a rank already finished entirely are done for everybody
        for e in range(merged.base_epoch, c.base_epoch):
            merged.done.setdefault(e, set()).update(range(c.num_shards))
        for e, shards in c.done.items():
            merged.done.setdefault(e, set()).update(shards)
        for k, xs in c.consumed.items():
            merged.consumed.setdefault(k, set()).update(xs)
        merged.totals.update(c.totals)
    for key in list(merged.totals) + list(merged.consumed):
        merged._maybe_done(*key)
    merged.compact()
    counters: dict[str, Any] = {}
    for s in states:
        for k, v in s.get("counters", {}).items():
            if isinstance(v, dict):
                d = counters.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            else:
                counters[k] = counters.get(k, 0) + v
    out = {"cursor": merged.state_dict(), "counters": counters, "merged": True}
    # stream layouts (loader.py): kept when every part has one of the same layout and origin (each
    # rank holds its own consumers' snapshots); otherwise a resume reshuffles what remains
    layouts = [s.get("layout") for s in states]
    if all(x is not None and (x["key"], x["origin"]) == (layouts[0]["key"], layouts[0]["origin"]) for x in layouts):
        out["layout"] = {"key": layouts[0]["key"], "origin": layouts[0]["origin"],
                         "consumers": {k: v for x in layouts for k, v in x["consumers"].items()},
                         "next_role": {k: v for x in layouts for k, v in x["next_role"].items()}}
    return out
