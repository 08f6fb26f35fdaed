"""Deterministic validation loss: the same checkpoint always gives the same numbers, on any world size.

    val = ValidationSet(cfg, rank, world_size)        # reads and decodes the held-out samples once
    metrics = val.evaluate(module, parts.prepare)      # collective; {"val/loss", "val/loss_t0".., ...}

The set is the first `validation.samples` samples (0: all) of `validation.shards`, in shard order,
each evaluated at every t of `validation.t_values` (Lumina time: 0 noise, 1 data; SDXL maps each t to
the DDPM timestep of the nearest SNR and logs that timestep's t, as the trainer does). The caption is
built without dropout from the sample's own seed; the noise comes from a generator seeded with
(validation.seed, key, chunk), so nothing depends on the rank, the step or the training RNG.

Under ZeRO-1/2 each rank evaluates the shards it owns (shard i on rank i % world) and the per-(sample,
t) losses are gathered; under ZeRO-3 every forward gathers the weights collectively, so every rank
evaluates every sample in lockstep. The totals are summed in (shard, ordinal, t) order. Validation
shards must not be training shards (checked at start, naming both keys).
"""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lumina_illus.config import CaptionConfig, ConfigError, RunConfig, from_dict
from lumina_illus.data.batch import Batch
from lumina_illus.data.shards import ShardReadError, expand_shards, iter_tar, manifest_counts
from lumina_illus.data.stream import SkipSample, decode_sample
from lumina_illus.evaluation import metrics as M


def validation_urls(cfg: RunConfig) -> list[str]:
    """The validation shards, refused when one of them is also a training shard."""
    where = f"{cfg.source}: validation.shards"
    try:
        urls = expand_shards(cfg.validation.shards)
    except FileNotFoundError as e:
        raise ConfigError(f"{cfg.source}: validation.{e}") from None
    train = set(expand_shards(cfg.data.shards)) if cfg.data.shards else set()
    same = sorted(set(urls) & train)
    if same:
        raise ConfigError(f"{where} overlaps data.shards (held-out data must never be trained on): {same[:3]}")
    return urls


@dataclasses.dataclass
class _Item:
    shard: int
    ordinal: int
    key: str
    sample: dict[str, Any]  # decode_sample's output


class ValidationSet:
    """The held-out samples this rank evaluates, decoded once (see module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, *, every_rank_all: bool = False) -> None:
        v = cfg.validation
        self.cfg, self.urls = cfg, validation_urls(cfg)
        self.all_ranks = every_rank_all  # ZeRO-3: every rank evaluates every sample, nothing to gather
        quota = [None] * len(self.urls)
        if v.samples:
            counts = manifest_counts(self.urls)
            missing = [u for u in self.urls if u not in counts]
            if missing:
                raise ConfigError(f"{cfg.source}: validation.samples={v.samples} needs the sample counts of "
                                  f"manifest.json beside each shard; none for {missing[:3]}")
            left = v.samples
            for i, u in enumerate(self.urls):
                quota[i] = min(counts[u], left)
                left -= quota[i]
        own = [i for i in range(len(self.urls)) if every_rank_all or i % world_size == rank]
        caption = {**cfg.data.caption, "caption_dropout": 0.0, "tag_dropout": 0.0, "control_dropout": 0.0}
        cap = from_dict(CaptionConfig, caption, where="data.caption", prefix="data.caption.")
        self.items: list[_Item] = []
        self.skipped: dict[str, int] = {}
        for i in own:
            if quota[i] == 0:
                continue
            for ts in iter_tar(self.urls[i]):
                if isinstance(ts, ShardReadError):
                    self.skipped[ts.reason] = self.skipped.get(ts.reason, 0) + 1
                    break
                if quota[i] is not None and ts.index >= quota[i]:
                    break
                try:
                    rng = random.Random(f"val/{v.seed}/{ts.key}")
                    d = decode_sample(ts, cfg.data, cap, rng, cfg.data.cached_latents)
                except SkipSample as e:
                    self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                    continue
                self.items.append(_Item(i, ts.index, ts.key, d))

    def _batch(self, item: _Item, n: int) -> Batch:
        d = item.sample
        return Batch(
            keys=[item.key] * n, captions=[d["caption"]] * n,
            images=None if d["pixels"] is None else [d["pixels"]] * n,
            latents=None if d["latent"] is None else [d["latent"]] * n,
            original_sizes=[d["original_size"]] * n, crops=[d["crop"]] * n, target_sizes=[d["bucket"]] * n,
            text_embeds=None if d["text_embeds"] is None else [d["text_embeds"]] * n,
            text_pooled=None if d["text_pooled"] is None else [d["text_pooled"]] * n,
        )

    @torch.no_grad()
    def losses(self, module: nn.Module, prepare: Callable[..., dict[str, Any]]) -> list[tuple[int, int, int, float, float]]:
        """(shard, ordinal, t index, t used, loss) of every (own sample, t value)."""
        v = self.cfg.validation
        rows = []
        was_training = module.training
        module.eval()
        for item in self.items:
            for start in range(0, len(v.t_values), v.micro_batch):
                ts = v.t_values[start : start + v.micro_batch]
                seed = zlib.crc32(f"{v.seed}/{self.urls[item.shard]}/{item.key}/{start}".encode())
                gen = torch.Generator().manual_seed(seed)
                inputs = prepare(self._batch(item, len(ts)), gen, t=torch.tensor(ts, dtype=torch.float32))
                out = module(**inputs)
                for j, (t, loss) in enumerate(zip(out.t.float().cpu().tolist(), out.per_sample.float().cpu().tolist())):
                    rows.append((item.shard, item.ordinal, start + j, t, loss))
        module.train(was_training)
        return rows

    def evaluate(self, module: nn.Module, prepare: Callable[..., dict[str, Any]]) -> dict[str, float]:
        """Collective under a process group of more than one rank: every rank gets the same metrics."""
        rows, skipped = self.losses(module, prepare), dict(self.skipped)
        if not self.all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (rows, skipped))
            rows, skipped = [r for p, _ in parts for r in p], {}
            for _, s in parts:
                for k, n in s.items():
                    skipped[k] = skipped.get(k, 0) + n
        return summarize(sorted(rows), skipped)


def summarize(rows: list[tuple[int, int, int, float, float]], skipped: dict[str, int]) -> dict[str, float]:
    """val/loss (mean over (sample, t)), val/loss_t0..9 (by the t bin of each row), counts."""
    out: dict[str, float] = {M.VAL_SAMPLES: len({(r[0], r[1]) for r in rows}), M.VAL_SKIPPED: sum(skipped.values())}
    if not rows:
        return out
    out[M.VAL_LOSS] = math.fsum(r[4] for r in rows) / len(rows)
    bins: dict[str, list[float]] = {}
    for _, _, _, t, loss in rows:
        bins.setdefault(M.val_loss_t_key(t), []).append(loss)
    for k, xs in bins.items():
        out[k] = math.fsum(xs) / len(xs)
    return out
