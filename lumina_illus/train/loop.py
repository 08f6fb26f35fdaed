"""The training loop. `train(cfg)` builds the components and runs optimizer steps; each step reads
top to bottom: get batch, prepare, forward, loss, backward, step, EMA, log, maybe checkpoint.

Every collective (gathering step stats, checkpoint, sample grid) happens at the same place on every
rank; decisions that depend on one rank (a signal, the checkpoint clock, a NaN) are shared in the
per-step stats gather, so all ranks always take the same branch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

from lumina_illus.config import RunConfig, save_config
from lumina_illus.data.batch import Batch
from lumina_illus.data.loader import build_loader
from lumina_illus.evaluation import metrics as M
from lumina_illus.families import TrainingParts, get_family
from lumina_illus.train import hooks
from lumina_illus.train.batching import check_batch_arithmetic
from lumina_illus.train.checkpoint import Checkpointer, TrainState
from lumina_illus.train.cluster import Peers
from lumina_illus.train.data_health import SkipGuard, TooManyBadSamples, examples
from lumina_illus.train.ema import ShardedEMA
from lumina_illus.train.engine import DistEnv, build_engine, init_distributed, set_lr
from lumina_illus.train.precision import precision_report
from lumina_illus.train.rng import seed_everything
from lumina_illus.train.schedule import lr_factor
from lumina_illus.train.signals import StopFlag
from lumina_illus.train.telemetry import (
    StepStats,
    Telemetry,
    gather_keys,
    gather_stats,
    git_revision,
    memory_gib,
    peak_flops,
    step_metrics,
)
from lumina_illus.train.validation import ValidationSet


class TooManyBadSteps(RuntimeError):
    """Raised after train.max_bad_steps consecutive non-finite steps (a checkpoint was written)."""


def _timed_next(batches: Iterator[Batch], stats: StepStats) -> Batch:
    t0 = time.perf_counter()
    batch = next(batches)
    stats.data_wait += time.perf_counter() - t0
    return batch


@dataclass
class Built:
    """Everything a run is made of, built and (when resuming) restored by `build_run`."""

    env: DistEnv
    parts: TrainingParts
    engine: deepspeed.DeepSpeedEngine
    loader: Any
    ema: ShardedEMA | None
    generators: dict[str, torch.Generator]
    ckpt: Checkpointer
    state: TrainState
    resume: Path | None
    universal: bool  # resumed from a state saved by another world size (DeepSpeed universal load)
    val: ValidationSet | None
    git: dict[str, Any]


def build_run(cfg: RunConfig, env: DistEnv | None = None, git: dict[str, Any] | None = None) -> Built:
    """Collective: join the process group (unless `env` says it was joined), build model, engine, loader and
    EMA, and restore the resume state named by `checkpoint.resume`, if any."""
    env = env or init_distributed(cfg.train.collective_timeout_s)
    check_batch_arithmetic(cfg, env.world_size)
    seed_everything(cfg.run.seed + env.rank)
    parts = get_family(cfg.family).build_training(cfg, env.device)
    git = git or git_revision()
    ckpt = Checkpointer(cfg, env.rank, env.world_size, git)
    resume = ckpt.resume_path()
    # saved by another world size: converted to DeepSpeed's universal format, which the engine must
    # know at init (collective)
    universal = resume is not None and ckpt.prepare_resume(resume)
    engine = build_engine(cfg, parts, env, load_universal=universal)
    loader = build_loader(cfg.data, micro_batch=cfg.train.micro_batch, rank=env.rank,
                          world_size=env.world_size, seed=cfg.run.seed)
    ema = ShardedEMA(engine.module, cfg.ema, env.rank, env.world_size) if cfg.ema.enabled else None
    # held-out loss: under ZeRO-3 every forward is collective, so every rank evaluates every sample
    val = (ValidationSet(cfg, env.rank, env.world_size, every_rank_all=engine.zero_optimization_partition_weights())
           if cfg.validation.every_steps else None)
    # the t and noise draws of `prepare`: one stream per rank, saved in checkpoints
    gen = torch.Generator(device=env.device).manual_seed(cfg.run.seed * 1_000_003 + env.rank)
    generators = {"prepare": gen}
    state = TrainState()
    if resume is not None:
        state = ckpt.load(resume, engine, ema, loader, generators)
    return Built(env, parts, engine, loader, ema, generators, ckpt, state, resume, universal, val, git)


def train(cfg: RunConfig) -> TrainState:
    """Run (or resume) the training described by `cfg`; returns the final train state. Refuses to start
    when the ranks disagree on config or code; stops with PeerLost naming the ranks that died."""
    env, git = init_distributed(cfg.train.collective_timeout_s), git_revision()
    peers = Peers.join(cfg, env, git)  # collective: same config and code everywhere, or ConfigError
    with peers.watch():  # a collective failing because other ranks died names them
        return _train(cfg, peers, env, git)


def _train(cfg: RunConfig, peers: Peers, env: DistEnv, git: dict[str, Any]) -> TrainState:
    b = build_run(cfg, env, git)
    env, parts, engine, loader, ema, generators, ckpt, state = (
        b.env, b.parts, b.engine, b.loader, b.ema, b.generators, b.ckpt, b.state)
    gen, git, resume = generators["prepare"], b.git, b.resume
    if env.rank == 0:
        save_config(cfg, cfg.run_dir / "config.yaml")
    tel = Telemetry(cfg, env.rank, state.step, git)
    tel.event(state.step, "distributed", world_size=env.world_size, ranks=peers.table())
    if resume is not None:
        tel.event(state.step, "resumed", path=str(resume), samples_seen=state.samples_seen, universal=b.universal)
    stop = StopFlag()
    skip_guard = SkipGuard(cfg.data)  # data.max_skip_fraction over the last data.skip_window samples
    peak = peak_flops(cfg, env.device)
    batches = iter(loader)
    reported_precision = False
    engine.train()
    try:
        while state.step < cfg.train.max_steps:
            stats = StepStats()
            t0 = time.perf_counter()
            lr = set_lr(engine, lr_factor(state.step, cfg.optim, cfg.train.max_steps))
            for micro in range(cfg.train.grad_accum):
                batch = _timed_next(batches, stats)
                stats.add_keys(batch.keys, batch.captions, micro)
                inputs = parts.prepare(batch, gen)  # frozen no-grad work: latents, text features, t, noise
                out = engine(**inputs)  # LossOutput
                engine.backward(out.loss)  # scaled by 1/grad_accum inside DeepSpeed
                engine.step()  # optimizer update on the accumulation boundary only
                stats.add_losses(out.per_sample, out.t)
                stats.add_extras(out.extras)
                stats.samples += len(batch)
                stats.tokens += parts.tokens(batch)
                stats.flops += parts.flops(batch)
            state.step += 1
            # DeepSpeed's ZeRO optimizer skipped the update when the grad norm was inf/nan
            applied = engine.was_step_applied()
            if applied:
                state.bad_in_row = 0
                if ema is not None:
                    state.ema_updates += int(ema.update(state.step))
            else:
                state.bad_in_row += 1
                state.skipped_steps += 1
            stats.step_time = time.perf_counter() - t0
            stats.add_data(loader.stats())  # skip counts, packing: summed over ranks in the gather
            stats.stop = bool(stop)
            stats.save_now = ckpt.due_by_time()
            g = gather_stats(stats, env.device)  # collective: totals and agreed flags
            if cfg.telemetry.log_sample_keys:
                tel.event(state.step, "data_keys", keys=gather_keys(stats.keys))  # collective
            state.samples_seen += g["samples"]
            state.flops_seen += g["flops"]  # for curves against compute (eval/char_recall.py --x flops)
            state.train_seconds += g["step_time_max"]
            skip_guard.update(g["data"])
            bad_data = skip_guard.verdict()  # the same on every rank: computed from gathered counts

            grad_norm = engine.get_global_grad_norm()
            metrics = step_metrics(
                g, stats, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                samples_seen=state.samples_seen, skipped=state.skipped_steps, peak=peak,
                world=env.world_size, mem=memory_gib(env.device),
                samples_per_epoch=loader.samples_per_epoch, skip_fraction=skip_guard.fraction,
            )
            # every telemetry.log_every steps, and every skipped step (so the one that hits train.max_bad_steps)
            # and the step that stops the run for bad data, once each
            write = state.step % cfg.telemetry.log_every == 0 or not applied or bad_data is not None
            tel.log(state.step, metrics, write=write)
            if not applied:
                tel.event(state.step, "skipped_step", nonfinite_loss=g["nonfinite_loss"], grad_norm=grad_norm)
            elif not reported_precision:  # the dtypes DeepSpeed really holds, once the Adam states exist
                tel.event(state.step, "precision", **precision_report(engine))
                reported_precision = True

            if cfg.sampling.every_steps and state.step % cfg.sampling.every_steps == 0:
                grid = hooks.sample_grid(cfg, engine, parts, env.rank)
                if grid is not None:
                    tel.grid(state.step, grid)
            if b.val is not None and state.step % cfg.validation.every_steps == 0:
                tel.record(state.step, b.val.evaluate(engine.module, parts.prepare))  # collective
            if cfg.eval.char_recall_every and state.step % cfg.eval.char_recall_every == 0:
                result = hooks.char_recall(cfg, engine, parts, env.rank)
                if result is not None:
                    tel.record(state.step, {M.CHAR_RECALL: result["recall"]})

            too_bad = state.bad_in_row >= cfg.train.max_bad_steps
            final = state.step == cfg.train.max_steps
            save_state = (ckpt.due_by_steps(state.step) or g["save_now"] or g["stop"] or too_bad
                          or bad_data is not None or final)
            export = ckpt.export_due(state.step, save_state) or final
            if save_state or export:
                path = ckpt.save(engine, state, resume_state=save_state, export=export, parts=parts,
                                 ema=ema, loader=loader, generators=generators)
                tel.event(state.step, "checkpoint", path=str(path), resume_state=save_state, export=export)
            if g["stop"]:
                tel.event(state.step, "stopped_by_signal", signal=stop.received or "received by another rank")
                break
            if bad_data:
                seen = examples(loader.stats()["recent_skips"], env.world_size)  # collective
                tel.event(state.step, "stopped_bad_data", verdict=bad_data, examples=seen)
                raise TooManyBadSamples(
                    f"{bad_data}; stopped at step {state.step} with a checkpoint in {ckpt.dir}. Examples:\n  "
                    + "\n  ".join(seen) + "\nFix or remove those files (data/make_shards.py reports bad inputs), "
                    f"or raise data.max_skip_fraction (now {cfg.data.max_skip_fraction}) to train on regardless."
                )
            if too_bad:
                raise TooManyBadSteps(
                    f"{state.bad_in_row} consecutive steps had a non-finite loss or gradient "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); stopped at step {state.step} with a "
                    f"checkpoint in {ckpt.dir}. Lower optim.lr or inspect the data near samples_seen="
                    f"{state.samples_seen}."
                )
    finally:
        tel.close()
    return state
