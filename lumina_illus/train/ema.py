"""EMA of the trainable weights, sharded like ZeRO-3: each rank keeps fp32 EMA of 1/world of every
parameter, so EMA memory per GPU is 4 bytes * params / world under every ZeRO stage.

The shard of a parameter is the same slice ZeRO-3 keeps (`param.ds_tensor`: the flattened parameter
padded to a multiple of world_size, chunk `rank`). Under ZeRO-3 the update reads `ds_tensor` directly
(no gather); under ZeRO-1/2 the full parameter lives on every rank and the update reads that slice of
it. One layout for every stage means one save/load format and one gather for the export.

    ema = ShardedEMA(engine.module, cfg.ema, rank, world_size)
    ema.update(step)                     # after every applied optimizer step
    full = ema.gather_full()             # collective; {name: full fp32 tensor} on rank 0, {} elsewhere
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from lumina_illus.config import EMAConfig


def _shard_bounds(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, end, shard_size) of `rank`'s chunk of a flat tensor padded to a multiple of `world`."""
    size = -(-numel // world)  # ceil: ZeRO-3's partition size
    start = min(rank * size, numel)
    return start, min(start + size, numel), size


class ShardedEMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world = world_size
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # shards start as a copy of the current weights (fp32)
        self.shadow = {n: self._local(p).float().clone() for n, p in self.params.items()}

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's flat shard of `p` (size ceil(numel/world), zero padded at the end)."""
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition this rank owns
            return p.ds_tensor.data.view(-1)
        numel = p.numel()
        start, end, size = _shard_bounds(numel, self.rank, self.world)
        flat = p.data.view(-1)[start:end]
        if end - start < size:
            flat = torch.cat([flat, flat.new_zeros(size - (end - start))])
        return flat

    def decay_at(self, step: int) -> float:
        """Decay of the update made after optimizer step `step` (0 before `start_step`: copy)."""
        return 0.0 if step < self.cfg.start_step else self.cfg.decay

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """EMA update after optimizer step `step` (1-based count of applied steps); returns whether
        this step was an update step (every `update_every` steps)."""
        if step % self.cfg.update_every:
            return False
        d = self.decay_at(step)
        for n, p in self.params.items():
            # shadow = d * shadow + (1 - d) * weights
            self.shadow[n].lerp_(self._local(p).float(), 1.0 - d)
        return True

    @torch.no_grad()
    def gather_full(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Collective over all ranks: full EMA tensors (on CPU, `dtype`) on rank 0, {} elsewhere.
        One parameter at a time so no rank ever holds more than one full tensor on the device."""
        out: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            shard = self.shadow[n]
            parts = [torch.empty_like(shard) for _ in range(self.world)]
            dist.all_gather(parts, shard)
            if self.rank == 0:
                shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
                numel = shape.numel() if isinstance(shape, torch.Size) else int(torch.Size(shape).numel())
                out[n] = torch.cat(parts)[:numel].view(shape).to("cpu", dtype)
        return out

    def shard_path(self, folder: Path, rank: int | None = None) -> Path:
        return Path(folder) / f"ema_rank_{self.rank if rank is None else rank:05d}.safetensors"

    def save(self, folder: Path) -> None:
        """Every rank writes its own shard file (no communication)."""
        tensors = {n: s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        save_file(tensors, str(self.shard_path(folder)), metadata={"world_size": str(self.world)})

    def load(self, folder: Path, saved_world: int) -> None:
        """Read this rank's shards; when the world size changed, rebuild full tensors from every
        saved shard and re-slice them for the new world size."""
        if saved_world == self.world:
            sd = load_file(str(self.shard_path(folder)))
            self._assign(sd, folder)
            return
        shards = [load_file(str(self.shard_path(folder, r))) for r in range(saved_world)]
        sd = {}
        for n, p in self.params.items():
            if n not in shards[0]:
                continue
            full = torch.cat([s[n] for s in shards])[: self._numel(p)]
            start, end, size = _shard_bounds(full.numel(), self.rank, self.world)
            sd[n] = torch.cat([full[start:end], full.new_zeros(size - (end - start))])
        self._assign(sd, folder)

    def _numel(self, p: nn.Parameter) -> int:
        return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()

    def _assign(self, sd: dict[str, torch.Tensor], folder: Path) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        if missing:
            raise ValueError(f"{folder}: EMA shard lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n in self.shadow:
            if sd[n].shape != self.shadow[n].shape:
                raise ValueError(f"{folder}: EMA shard of {n!r} has shape {tuple(sd[n].shape)}, "
                                 f"expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(sd[n])
