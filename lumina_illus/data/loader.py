"""The trainer-facing loader: an endless iterator of Batch for one rank, with a resumable cursor.

    loader = build_loader(cfg.data, micro_batch=4, rank=rank, world_size=world, seed=cfg.run.seed)
    it = iter(loader)
    batch = next(it)                        # Batch (lumina_illus/data/batch.py)
    state = loader.state_dict()             # collective when torch.distributed is up: every rank
                                            # gets the same merged global state; save it once
    loader.load_state_dict(state)           # then iter(loader) again: continues from the cursor
    loader.stats()                          # skip counts per reason, packing efficiency, epoch, ...
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lumina_illus.config import DataConfig
from lumina_illus.data.batch import Batch
from lumina_illus.data.cursor import Cursor, fingerprint, merge_states
from lumina_illus.data.reasons import SHARD_ERRORS, SKIP_REASONS
from lumina_illus.data.shards import expand_shards, manifest_counts
from lumina_illus.data.stream import ShardStream

_RECENT = 20  # skipped samples kept for stats()["recent_skips"]

log = logging.getLogger("lumina_illus.data")


class Loader:
    """Endless Batch iterator for one rank. The data never runs out (epochs chain into each other),
    so ranks never wait on each other at an epoch boundary; `stats()["epoch"]` follows the cursor."""

    def __init__(
        self, cfg: DataConfig, *, micro_batch: int, rank: int, world_size: int, seed: int, latent_mode: bool
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.cfg, self.micro_batch, self.rank, self.world_size = cfg, micro_batch, rank, world_size
        self.seed, self.latent_mode = seed, latent_mode
        self.urls = expand_shards(cfg.shards)
        self.cursor = Cursor(len(self.urls), seed, fingerprint(self.urls))
        self.expected = manifest_counts(self.urls)  # url -> samples, from manifests beside the shards
        self.samples_per_epoch = sum(self.expected.values()) if len(self.expected) == len(self.urls) else None
        self.counters: dict[str, Any] = self._zero_counters()
        self.recent: collections.deque[str] = collections.deque(maxlen=_RECENT)
        self.last_sources: list[tuple[int, int, int]] = []  # (epoch, shard index, ordinal) of the last batch
        # (epoch, shard, ordinal, reason, shard url, key, message, samples lost) reported with it
        self.last_skips: list[tuple] = []
        self.reading_epoch = 0  # newest epoch this rank has delivered samples of
        # the stream layout: work items are dealt from `origin` (the cursor this layout started from);
        # consumers[str(id)] is each of this rank's consumers' snapshot after its last consumed batch;
        # next_role is the worker role whose batch the trainer gets next (DataLoader goes round-robin)
        self.origin: dict[str, Any] = self.cursor.state_dict()
        self.snapshots: dict[str, Any] = {}
        self.next_role = 0

    @staticmethod
    def _zero_counters() -> dict[str, Any]:
        return {"skipped": dict.fromkeys(SKIP_REASONS, 0), "shard_errors": dict.fromkeys(SHARD_ERRORS, 0),
                "batches": 0, "samples": 0, "tokens": 0, "budget": 0, "buckets": {}}

    def layout_key(self) -> dict[str, Any]:
        """What must be unchanged for a resume to continue the same batch sequence."""
        c = self.cfg
        key = {"world_size": self.world_size, "num_workers": c.num_workers, "micro_batch": self.micro_batch,
               "batching": c.batching, "token_budget": c.token_budget, "shuffle_buffer": c.shuffle_buffer,
               "latent_mode": self.latent_mode}
        if c.pack_lookahead != DataConfig.pack_lookahead:  # absent at the default: older states still match
            key["pack_lookahead"] = c.pack_lookahead
        return key

    # ---- iteration

    def _dataloader(self) -> DataLoader:
        layout = {"origin": self.origin, "role_offset": self.next_role, "consumers": self.snapshots}
        ds = ShardStream(self.cfg, self.urls, layout, micro_batch=self.micro_batch,
                         rank=self.rank, world_size=self.world_size, seed=self.seed, latent_mode=self.latent_mode,
                         expected=self.expected)
        nw = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=None,  # workers yield whole micro-batches
            num_workers=nw,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[Batch]:
        for batch, book in self._dataloader():
            self._account(book)
            yield batch

    def _account(self, book: dict[str, Any]) -> None:
        c = self.counters
        self.last_sources = [tuple(x) for x in book["samples"]]
        self.last_skips = []
        for kind, p in book["events"]:
            if kind == "end":
                self.cursor.set_total(*p)
                continue
            epoch, shard, ordinal, reason, where, key, msg, lost = p
            c["skipped"][reason] += lost  # samples: 1 for a sample, the known loss for a shard read
            if reason in SHARD_ERRORS:
                c["shard_errors"][reason] += 1
            self.last_skips.append(tuple(p))
            self.recent.append(f"{reason}: shard={where}" + (f" key={key}" if key else "") + f": {msg}")
            if ordinal >= 0:
                self.cursor.mark(epoch, shard, ordinal)
        for e, s, i in book["samples"]:
            self.cursor.mark(e, s, i)
            self.reading_epoch = max(self.reading_epoch, e)
        n = len(book["samples"])
        self.cursor.samples_seen += n
        self.snapshots[str(book["consumer"])] = book["snapshot"]
        self.next_role = (book["role"] + 1) % max(1, self.cfg.num_workers)
        c["batches"] += 1
        c["samples"] += n
        c["tokens"] += book["tokens"]
        c["budget"] += book["budget"]
        for h, w in book["buckets"]:
            k = f"{h}x{w}"
            c["buckets"][k] = c["buckets"].get(k, 0) + 1

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor and counters; with torch.distributed initialised over this loader's
        world, all ranks' states are gathered and merged (a collective: call it on every rank)."""
        own = {"cursor": self.cursor.state_dict(), "counters": self.counters,
               "layout": {"key": self.layout_key(), "origin": self.origin, "consumers": self.snapshots,
                          "next_role": {str(self.rank): self.next_role}}}
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(f"loader world_size {self.world_size} != process group {dist.get_world_size()}")
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, own)
            return merge_states(parts)
        return merge_states([own])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a (merged) state; takes effect at the next iter(loader). Counters go to rank 0 only,
        so that the next merge does not count them once per rank."""
        if "cursor" not in state:
            raise ValueError("data loader state: missing 'cursor' (not a state from Loader.state_dict)")
        c = Cursor.from_state(state["cursor"])
        if (c.num_shards, c.urls_fingerprint) != (len(self.urls), self.cursor.urls_fingerprint):
            raise ValueError(
                f"data loader state: saved for {c.num_shards} shards (fingerprint {c.urls_fingerprint}), "
                f"data.shards now gives {len(self.urls)} (fingerprint {self.cursor.urls_fingerprint}); "
                "the cursor only applies to the same shard list")
        if c.seed != self.seed:
            raise ValueError(f"data loader state: saved with seed {c.seed}, loader seed is {self.seed}")
        if self.rank != 0:
            c.samples_seen = 0
        self.cursor = c
        self.reading_epoch = c.base_epoch
        saved = state.get("layout")
        if saved is not None and saved["key"] == self.layout_key():
            # same layout: every consumer continues its own stream from its snapshot
            nw = max(1, self.cfg.num_workers)
            own = {str(self.rank * nw + r) for r in range(nw)}
            self.origin = saved["origin"]
            self.snapshots = {k: v for k, v in saved["consumers"].items() if k in own}
            self.next_role = int(saved["next_role"].get(str(self.rank), 0))
        else:
            why = ("the state holds no stream layout" if saved is None else
                   f"the world changed: saved {saved['key']}, now {self.layout_key()}")
            if self.rank == 0:
                log.info("data: remaining samples are reshuffled (%s); no sample of the epoch is repeated or "
                         "skipped", why)
            # the loaded global cursor (rank 0's samples_seen included, so the origin is the same on
            # every rank and the next merge keeps the layout)
            self.origin, self.snapshots, self.next_role = Cursor.from_state(state["cursor"]).state_dict(), {}, 0
        self.counters = self._zero_counters()
        if self.rank == 0:
            saved = state.get("counters", {})
            for k, v in saved.items():
                if isinstance(v, dict):
                    self.counters.setdefault(k, {}).update(v)
                else:
                    self.counters[k] = v

    # ---- telemetry

    def stats(self) -> dict[str, Any]:
        """This rank's counters since the start of the run (rank 0 also holds what was loaded)."""
        c = self.counters
        return {
            "epoch": self.reading_epoch,  # newest epoch this rank delivered samples of
            "oldest_open_epoch": self.cursor.base_epoch,  # global after a load; per rank it lags
            "samples_seen": self.cursor.samples_seen,  # this rank's (rank 0: plus all ranks' before the load)
            "samples_per_epoch": self.samples_per_epoch,  # from manifests; None when unknown
            "shards": len(self.urls),
            "batches": c["batches"],
            "samples": c["samples"],
            "tokens": c["tokens"],  # image tokens delivered
            "budget": c["budget"],  # token budget of the micro-batches delivered (bucket mode: their tokens)
            "skipped": dict(c["skipped"]),  # samples per reason (shard errors: samples lost, where known)
            "skipped_total": sum(c["skipped"].values()),
            "shard_errors": dict(c["shard_errors"]),  # failed shard reads per reason (after retries)
            "packing_efficiency": c["tokens"] / c["budget"] if c["budget"] else None,
            "tokens_per_batch": c["tokens"] / c["batches"] if c["batches"] else None,
            "samples_per_batch": c["samples"] / c["batches"] if c["batches"] else None,
            "buckets": dict(c["buckets"]),
            "recent_skips": list(self.recent),
        }


def build_loader(
    cfg: DataConfig,
    *,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    latent_mode: bool = False,
) -> Loader:
    """The loader of one rank (see module docstring). `latent_mode` (or cfg.cached_latents) reads
    shards written by data/cache_latents.py: Batch.latents is set instead of Batch.images."""
    return Loader(cfg, micro_batch=micro_batch, rank=rank, world_size=world_size, seed=seed,
                  latent_mode=latent_mode or cfg.cached_latents)
