"""How many samples one optimizer step holds, checked once at start.

Both batching modes obey one equation, checked before anything is built:

    global_batch == micro_batch * grad_accum * world_size

- bucket mode: every micro-batch holds exactly `micro_batch` samples of one bucket, so a step holds
  exactly `global_batch` samples.
- token mode (DiT packing): every rank still runs exactly `grad_accum` micro-batches per step (ZeRO
  collectives need the same number of forward/backward passes on every rank, so ranks agree by
  construction); each micro-batch is packed up to `data.token_budget` image tokens and at most
  `micro_batch` samples. A step therefore holds at most `global_batch` samples and a fixed token
  capacity of `token_budget * grad_accum * world_size`; `samples_seen` counts the samples really
  consumed, summed over ranks every step, so the eval curve stays exact.
"""

from __future__ import annotations

from lumina_illus.config import ConfigErrorOnEveryRank, RunConfig


def check_batch_arithmetic(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigErrorOnEveryRank naming the numbers when the global batch does not add up."""
    t = cfg.train
    product = t.micro_batch * t.grad_accum * world_size
    if product != t.global_batch:
        hint = ""
        per_rank, rem = divmod(t.global_batch, world_size)
        if rem == 0 and per_rank % t.micro_batch == 0:
            hint = f"; with {world_size} ranks use train.grad_accum={per_rank // t.micro_batch}"
        raise ConfigErrorOnEveryRank(
            f"{cfg.source}: batch arithmetic does not add up: train.global_batch={t.global_batch} but "
            f"train.micro_batch={t.micro_batch} x train.grad_accum={t.grad_accum} x world_size={world_size}"
            f" = {product}{hint}"
        )


def step_token_capacity(cfg: RunConfig, world_size: int) -> int | None:
    """Image-token capacity of one optimizer step in token mode (None in bucket mode)."""
    if cfg.data.batching != "tokens":
        return None
    return cfg.data.token_budget * cfg.train.grad_accum * world_size
