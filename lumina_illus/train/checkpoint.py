"""Checkpoints: resume state and consolidated exports, written atomically.

    runs/<name>/ckpt/
      latest                         name of the newest step folder holding a resume state
      step_0001000/
        ds/                          resume state (pruned to the last `keep_last`):
          state/...                  DeepSpeed: module, optimizer partitions (every rank)
          trainer_state.json         step, samples seen, skipped steps, world size, data cursor, git, config
          rank_00000.json ...        RNG state of every rank
          ema_rank_00000.safetensors EMA shard of every rank
        meta.json                    {"family", "step", "samples_seen", "flops_seen", "train_seconds", "run", "config"}
        <family export files>        consolidated raw weights (TrainingParts.export), kept forever
        ema/                         consolidated EMA weights, same layouts

A folder is written under `.tmp_step_X` by all ranks and renamed by rank 0 only once complete, then
`latest` is replaced atomically, so a run killed at any moment leaves either the previous or the new
checkpoint, never half of one.

Resuming on another number of ranks (`trainer_state.json` world size != this run's): ZeRO optimizer
partitions cannot be re-cut by DeepSpeed's ordinary load, so before the engine is built
(`prepare_resume`) rank 0 converts `ds/state` once into DeepSpeed's universal checkpoint format with
`python -m deepspeed.checkpoint.ds_to_universal`, written under `ds/.tmp_universal/` and renamed to
`ds/state_universal/` only when complete (a later resume on another world size reuses it; a crash
mid-conversion leaves only the tmp folder, removed by the next attempt); the other ranks wait. The
engine is then built with `checkpoint.load_universal` and loads that tag: fp32 master weights and
Adam moments re-partitioned for the new world (ZeRO 1, 2 and 3), the module weights taken from them.
Step, samples seen, skip counters and the global data cursor carry over, EMA shards are re-sliced
(ShardedEMA.load), RNG streams are re-seeded. The batch arithmetic must still add up with the new
world size (`train.grad_accum` / `train.micro_batch` via --override; checked first, with the numbers
to use). With the same world size nothing is converted and `ds/state` loads as before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from lumina_illus.config import RunConfig, to_dict
from lumina_illus.families import TrainingParts
from lumina_illus.train.ema import ShardedEMA
from lumina_illus.train.rng import rng_state, set_rng_state

DS_TAG = "state"  # DeepSpeed's tag folder inside ds/
UNIVERSAL_TAG = "state_universal"  # DS_TAG converted to DeepSpeed's universal format (world size changes)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (applied or skipped)
    samples_seen: int = 0  # image samples consumed over all ranks
    skipped_steps: int = 0  # steps skipped for non-finite loss or gradients, in total
    bad_in_row: int = 0  # consecutive skipped steps (the run stops at train.max_bad_steps)
    ema_updates: int = 0  # applied steps seen by the EMA
    flops_seen: float = 0.0  # model training FLOPs (forward + backward) over all ranks since step 0
    train_seconds: float = 0.0  # wall-clock of the optimizer steps since step 0 (slowest rank; no checkpoint/eval time)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


class Checkpointer:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int, git: dict[str, Any]) -> None:
        self.cfg = cfg
        self.c = cfg.checkpoint
        self.rank = rank
        self.world = world_size
        self.git = git
        self.dir = cfg.run_dir / "ckpt"
        self.last_save_time = time.monotonic()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.dir.glob(".tmp_step_*"):  # left by a run killed while saving
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()

    # -- when ---------------------------------------------------------------------------------

    def due_by_steps(self, step: int) -> bool:
        return self.c.every_steps > 0 and step % self.c.every_steps == 0

    def due_by_time(self) -> bool:
        """Rank-local clock; the loop shares rank 0's answer with every rank."""
        return self.c.every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * self.c.every_minutes

    def export_due(self, step: int, saving_state: bool) -> bool:
        if self.c.export_every_steps > 0:
            return step % self.c.export_every_steps == 0
        return saving_state

    # -- save ---------------------------------------------------------------------------------

    def metadata(self, state: TrainState, weights: str) -> dict[str, Any]:
        return {
            "family": self.cfg.family,
            "step": state.step,
            "samples_seen": state.samples_seen,
            "flops_seen": state.flops_seen,
            "train_seconds": state.train_seconds,
            "run": self.cfg.run.name,
            "weights": weights,
            "git": self.git,
            "config": to_dict(self.cfg),
        }

    def save(
        self,
        engine: deepspeed.DeepSpeedEngine,
        state: TrainState,
        *,
        resume_state: bool,
        export: bool,
        parts: TrainingParts,
        ema: ShardedEMA | None,
        loader: Any,
        generators: dict[str, torch.Generator],
    ) -> Path:
        """Collective: every rank calls it with the same flags. Returns the final step folder."""
        final = self.dir / step_name(state.step)
        tmp = self.dir / (".tmp_" + step_name(state.step))
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if resume_state:
            self._save_state(engine, state, tmp / "ds", ema, loader, generators)
        if export:
            self._export(engine, state, tmp, parts, ema)
        dist.barrier()
        if self.rank == 0:
            if final.exists():  # the same step saved before (export first, state now): merge
                for item in final.iterdir():
                    if not (tmp / item.name).exists():
                        os.replace(item, tmp / item.name)
                shutil.rmtree(final)
            os.replace(tmp, final)
            if resume_state:
                (self.dir / "latest.tmp").write_text(final.name)
                os.replace(self.dir / "latest.tmp", self.dir / "latest")
                self.prune()
        if resume_state:
            self.last_save_time = time.monotonic()
        dist.barrier()
        return final

    def _save_state(self, engine, state, ds_dir: Path, ema, loader, generators) -> None:
        # a LoRA run's frozen base comes back from model.pretrained (or the seeded init): not saved each time
        engine.save_checkpoint(str(ds_dir), tag=DS_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=self.cfg.lora.enabled)
        data_cursor = loader.state_dict()  # collective: the merged global cursor, same on every rank
        _write_json(ds_dir / f"rank_{self.rank:05d}.json", {"rng": rng_state(generators)})
        if ema is not None:
            ema.save(ds_dir)
        if self.rank == 0:
            _write_json(ds_dir / "trainer_state.json", {
                **asdict(state), "world_size": self.world, "data": data_cursor, "git": self.git,
                "config": to_dict(self.cfg),
            })

    def _export(self, engine, state, out: Path, parts: TrainingParts, ema: ShardedEMA | None) -> None:
        dtype = torch.bfloat16 if self.c.export_dtype == "bf16" else torch.float32
        if engine.zero_optimization_partition_weights():  # ZeRO-3: gather layer by layer (collective)
            raw = engine._zero3_consolidated_16bit_state_dict()
        else:
            raw = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if self.rank == 0 else None
        ema_full = ema.gather_full() if ema is not None and self.c.export_ema else None  # collective
        if self.rank != 0:
            return
        raw = _cast(raw, dtype)
        parts.export(raw, out, self.metadata(state, "raw"))
        if ema_full is not None:
            # frozen parameters and buffers are not averaged: take them from the raw weights
            ema_sd = {**raw, **_cast(ema_full, dtype)}
            (out / "ema").mkdir(exist_ok=True)
            parts.export(ema_sd, out / "ema", self.metadata(state, "ema"))
        meta = {k: v for k, v in self.metadata(state, "raw").items() if k in ("family", "step", "samples_seen", "flops_seen", "train_seconds", "run", "config")}
        _write_json(out / "meta.json", meta)

    def prune(self) -> None:
        """Delete the ds/ resume state of all but the newest `keep_last` checkpoints; exports stay."""
        with_state = sorted(p for p in self.dir.glob("step_*") if (p / "ds").is_dir())
        for old in with_state[: -self.c.keep_last]:
            shutil.rmtree(old / "ds")

    # -- resume -------------------------------------------------------------------------------

    def resume_path(self) -> Path | None:
        """The step folder to resume from, per `checkpoint.resume`, or None for a fresh start."""
        r = self.c.resume
        if r == "none":
            return None
        if r == "auto":
            latest = self.dir / "latest"
            if not latest.is_file():
                return None
            path = self.dir / latest.read_text().strip()
        else:
            path = Path(r)
        if not (path / "ds" / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"{self.cfg.source}: checkpoint.resume={r!r}: {path} holds no resume state "
                f"(expected {path / 'ds' / 'trainer_state.json'})"
            )
        return path

    def prepare_resume(self, path: Path) -> bool:
        """Collective, before the engine is built. True when `path` was saved by another world size:
        then `ds/state_universal` exists (converted here by rank 0 if needed) and the engine must be
        built with DeepSpeed's `checkpoint.load_universal` (build_engine(load_universal=True))."""
        ds_dir = path / "ds"
        saved_world = json.loads((ds_dir / "trainer_state.json").read_text())["world_size"]
        if saved_world == self.world:
            return False
        error = None
        if self.rank == 0:
            try:
                self._convert_to_universal(ds_dir, saved_world)
            except Exception as e:  # every rank raises it, none waits forever at a barrier
                error = f"{type(e).__name__}: {e}"
        msg = [error]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise RuntimeError(
                f"{path}: saved by {saved_world} ranks, this run has {self.world}; converting {ds_dir / DS_TAG} "
                f"to DeepSpeed's universal checkpoint failed: {msg[0]}. Resume with {saved_world} ranks, or start "
                f"a new run from the exported weights (model.pretrained={path}, checkpoint.resume=none)."
            )
        return True

    def _convert_to_universal(self, ds_dir: Path, saved_world: int) -> None:
        """Rank 0: ds/state -> ds/state_universal with DeepSpeed's converter, once, atomically."""
        final = ds_dir / UNIVERSAL_TAG
        if final.is_dir():
            print(f"[resume] world size {saved_world} -> {self.world}: reusing {final}", flush=True)
            return
        tmp_root = ds_dir / ".tmp_universal"  # the converter also writes `latest_universal` beside its output
        shutil.rmtree(tmp_root, ignore_errors=True)  # left by a conversion that was killed
        tmp_root.mkdir()
        out = tmp_root / UNIVERSAL_TAG
        print(f"[resume] world size {saved_world} -> {self.world}: converting {ds_dir / DS_TAG} to DeepSpeed's "
              f"universal checkpoint {final}", flush=True)
        t0 = time.monotonic()
        # --inject_missing_state: our states carry no `universal_checkpoint_info` (a Megatron-style
        # tensor/pipeline-parallel description); plain data parallelism needs only its version
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(ds_dir / DS_TAG), "--output_folder", str(out), "--inject_missing_state"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not (out / "zero" / "optimizer_state.pt").is_file():
                raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        print(f"[resume] converted in {time.monotonic() - t0:.1f}s", flush=True)

    def load(
        self,
        path: Path,
        engine: deepspeed.DeepSpeedEngine,
        ema: ShardedEMA | None,
        loader: Any,
        generators: dict[str, torch.Generator],
    ) -> TrainState:
        """Collective: restore engine, EMA, data cursor and RNG of this rank from `path`. With another
        world size than the saved one, `prepare_resume` must have returned True before the engine
        was built."""
        ds_dir = path / "ds"
        saved = json.loads((ds_dir / "trainer_state.json").read_text())
        saved_world = saved["world_size"]
        universal = saved_world != self.world
        if universal != bool(engine.load_universal_checkpoint()):
            raise RuntimeError(
                f"{path}: saved by {saved_world} ranks, this run has {self.world}, but the engine was built with "
                f"checkpoint.load_universal={engine.load_universal_checkpoint()}: call Checkpointer.prepare_resume "
                f"before build_engine and pass its answer as load_universal"
            )
        tag = UNIVERSAL_TAG if universal else DS_TAG
        loaded, _ = engine.load_checkpoint(str(ds_dir), tag=tag, load_lr_scheduler_states=False,
                                           load_module_strict=not self.cfg.lora.enabled)
        if loaded is None:
            raise FileNotFoundError(f"{ds_dir}: DeepSpeed could not load tag {tag!r}")
        # fields added later (flops_seen, train_seconds) start at 0 for states saved before them
        state = TrainState(**{k: saved.get(k, v) for k, v in asdict(TrainState()).items()})
        loader.load_state_dict(saved["data"])  # the global cursor survives a change of world size
        if saved_world == self.world:
            set_rng_state(json.loads((ds_dir / f"rank_{self.rank:05d}.json").read_text())["rng"], generators)
        elif self.rank == 0:
            print(f"[resume] world size {saved_world} -> {self.world}: optimizer state loaded from {ds_dir / tag}, "
                  "data cursor and EMA re-sliced, RNG re-seeded", flush=True)
        if ema is not None:
            ema.load(ds_dir, saved_world)  # EMA shards re-slice for a new world size
        return state
