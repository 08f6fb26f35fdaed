"""DeepSpeed setup from the run config: process group, engine, optimizer, device.

    dist_env = init_distributed()
    engine = build_engine(cfg, parts, dist_env)

The whole DeepSpeed JSON is derived from the YAML (`deepspeed_config`), with `train.deepspeed` merged
on top for expert settings (bucket sizes, offload), so a run is described by one file. The optimizer
is torch AdamW (fused on CUDA) over the family's param groups; ZeRO 1/2/3 wraps it. Non-finite
gradients: DeepSpeed's ZeRO optimizers skip the update when the global grad norm is inf/nan (all
stages, fp32 and bf16), which the loop reads back with `engine.was_step_applied()`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from lumina_illus.config import ConfigError, RunConfig
from lumina_illus.families import TrainingParts
from lumina_illus.train.cluster import pick_device


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_not_orphan_task(environ: dict[str, str] | os._Environ) -> None:
    """A process without RANK that is one of several tasks of an srun step (a bare `srun train.py`, or
    `deepspeed --launcher slurm`) would train alone, as would each of its siblings: N copies of the run
    writing the same files. Refuse that with the fix; a single process (python train.py, even inside an
    allocation) is fine."""
    n = int(environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if n > 1:
        raise ConfigError(
            f"this process is task {environ.get('SLURM_PROCID', '?')} of {n} of an srun step but no RANK/WORLD_SIZE "
            "is set, so every task would train alone on the same run folder. Launch with "
            "launch/slurm_lu.sbatch (it sets RANK=$SLURM_PROCID, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), "
            "or torchrun/deepspeed per node (README, Launching)")


def init_distributed(collective_timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group set up by the launcher (deepspeed, srun, torchrun) or, when the
    script was started alone (`bash launch/train_lu.sh`, `python train.py`), make a 1-rank group.
    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (README, Launching); a collective
    waiting longer than `collective_timeout_s` for the other ranks fails."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        check_not_orphan_task(os.environ)
        # started without a launcher: a single local rank (DeepSpeed would otherwise try MPI discovery)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    acc = get_accelerator()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False,
                                   timeout=timedelta(seconds=collective_timeout_s))
    if acc.device_name() == "cpu":
        release_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(acc.device_name(), local_rank, acc.device_count() if acc.device_name() == "cuda" else 0)
    if device.type == "cuda":
        acc.set_device(device.index)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU backend creates per rank for its shared-memory allreduce
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory allreduce segment once every rank has mapped all of them.

    DeepSpeed never unlinks these 66 MB segments, so each CPU run (every test, every toy run) left
    132 MB per 2 ranks in /dev/shm (RAM) until the machine ran out of memory. Every rank maps all
    peers' segments inside init_distributed, so after a barrier the names can go: the mappings stay
    valid until the processes exit, and a killed run leaves nothing behind."""
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config dict of a run (ZeRO stage, precision, batch sizes, clipping)."""
    t = cfg.train
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if t.zero_stage == 3:
        # needed by engine._zero3_consolidated_16bit_state_dict for the bf16 export
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.precision == "bf16":
        # accumulate gradients over micro-batches in fp32, not bf16
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(ds, t.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_optimizer(cfg: RunConfig, parts: TrainingParts, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the family's param groups; each group remembers its base LR as `base_lr` so the
    loop can apply the schedule multiplier to every group."""
    groups = []
    for g in parts.param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        lr = g.get("lr") or cfg.optim.lr
        groups.append({**g, "params": params, "lr": lr, "base_lr": lr})
    if not groups:
        raise ValueError(f"{cfg.source}: family {cfg.family!r} returned no trainable parameters")
    o = cfg.optim
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        fused=device.type == "cuda",
    )


def build_engine(cfg: RunConfig, parts: TrainingParts, env: DistEnv, *,
                 load_universal: bool = False) -> deepspeed.DeepSpeedEngine:
    """Wrap the family's training module in a DeepSpeed engine with our optimizer. `load_universal`
    (Checkpointer.prepare_resume's answer: resuming on another world size) sets DeepSpeed's
    `checkpoint.load_universal`, read once at engine init; the trainer owns this key."""
    optimizer = build_optimizer(cfg, parts, env.device)
    ds = _merge(deepspeed_config(cfg), {"checkpoint": {"load_universal": load_universal}})
    engine, _, _, _ = deepspeed.initialize(
        model=parts.module, optimizer=optimizer, config=ds, dist_init_required=False
    )
    return engine


def set_lr(engine: deepspeed.DeepSpeedEngine, factor: float) -> float:
    """Apply the schedule multiplier to every param group; returns the first group's LR."""
    for g in engine.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return engine.optimizer.param_groups[0]["lr"]
