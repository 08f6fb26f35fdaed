"""Per-step metrics: gathered from every rank in one collective, written by rank 0 to
runs/<name>/log.jsonl (always) and W&B (offline by default, files in runs/<name>/wandb/), with a
rank-0 tqdm bar showing the ETA. Metric names come from lumina_illus.evaluation.metrics so the
dashboards and the eval read exactly what is logged."""

from __future__ import annotations

import json
import math
import resource
import secrets
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from lumina_illus.config import RunConfig, to_dict
from lumina_illus.data.reasons import SHARD_ERRORS, SKIP_REASONS
from lumina_illus.evaluation import metrics as M
from lumina_illus.train.data_health import DATA_FIELDS, data_vector

# dense bf16 peak per device, FLOP/s (no sparsity); matched against torch.cuda.get_device_name()
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def git_revision() -> dict[str, Any]:
    """Commit of the code that runs, and whether the tree has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def peak_flops(cfg: RunConfig, device: torch.device) -> float | None:
    """Per-device peak FLOP/s for MFU: the config's value, else known GPUs, else None (no MFU)."""
    if cfg.telemetry.peak_tflops is not None:
        return cfg.telemetry.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


# layout of the per-rank vector gathered every step
_SCALARS = ("step_time", "data_wait", "samples", "tokens", "flops", "loss_sum", "loss_count",
            "stop", "save_now", "nonfinite_loss", "keys_crc", "data_epoch")
_NB = M.LOSS_T_BINS


@dataclass
class StepStats:
    """What one rank measured during one optimizer step."""

    step_time: float = 0.0
    data_wait: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    stop: bool = False  # this rank got SIGTERM/SIGUSR1
    save_now: bool = False  # checkpoint clock fired (only rank 0's answer is used)
    nonfinite_loss: int = 0
    keys_crc: int = 0  # fingerprint of the data: sum of crc32(key, caption) * (position in step + 1)
    extras: dict[str, float] = field(default_factory=dict)  # LossOutput.extras summed over micro-batches
    micro_batches: int = 0
    bin_sum: list[float] = field(default_factory=lambda: [0.0] * _NB)
    bin_count: list[int] = field(default_factory=lambda: [0] * _NB)
    data: list[float] = field(default_factory=lambda: [0.0] * len(DATA_FIELDS))  # loader counts (data_health)
    data_epoch: int = 0  # newest epoch this rank's loader delivered samples of
    keys: list[str] = field(default_factory=list)  # sample keys of this step, in order (telemetry.log_sample_keys)

    def add_data(self, loader_stats: dict[str, Any]) -> None:
        """This rank's cumulative loader counts (Loader.stats()), taken once per step."""
        self.data = data_vector(loader_stats)
        self.data_epoch = int(loader_stats["epoch"])

    def add_keys(self, keys: list[str], captions: list[str], micro: int) -> None:
        """Fold the sample keys and captions of micro-batch `micro` of this step into `keys_crc`."""
        self.keys_crc += sum(zlib.crc32(f"{k}\n{c}".encode()) * (micro + 1) for k, c in zip(keys, captions))
        self.keys.extend(keys)

    def add_extras(self, extras: dict[str, float]) -> None:
        self.micro_batches += 1
        for k, v in extras.items():
            self.extras[k] = self.extras.get(k, 0.0) + float(v)

    def add_losses(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """per_sample (B,) losses and their t (B,) in [0, 1]: into the total and the 10 t-bins."""
        per_sample = per_sample.detach().float().cpu()
        t = t.detach().float().cpu()
        finite = torch.isfinite(per_sample)
        self.nonfinite_loss += int((~finite).sum())
        bins = (t * _NB).long().clamp_(0, _NB - 1)  # (B,)
        for b, v, ok in zip(bins.tolist(), per_sample.tolist(), finite.tolist()):
            if ok:
                self.bin_sum[b] += v
                self.bin_count[b] += 1
        self.loss_sum += float(per_sample[finite].sum())
        self.loss_count += int(finite.sum())


def gather_stats(stats: StepStats, device: torch.device) -> dict[str, Any]:
    """Collective: every rank's StepStats -> totals, max/min step time, and agreed flags."""
    local = ([float(getattr(stats, k)) for k in _SCALARS] + stats.bin_sum + [float(c) for c in stats.bin_count]
             + stats.data)
    vec = torch.tensor(local, dtype=torch.float64, device=device)  # (K,)
    world = dist.get_world_size()
    rows = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(rows, vec)
    table = torch.stack(rows).cpu()  # (world, K)
    col = {k: table[:, i] for i, k in enumerate(_SCALARS)}
    n = len(_SCALARS)
    times = col["step_time"]
    return {
        "step_time_max": float(times.max()),
        "step_time_spread": float((times.max() - times.min()) / times.mean().clamp_min(1e-9)),
        "data_wait_frac": float((col["data_wait"] / times.clamp_min(1e-9)).mean()),
        "samples": int(col["samples"].sum()),
        "tokens": int(col["tokens"].sum()),
        "flops": float(col["flops"].sum()),
        "loss": float(col["loss_sum"].sum() / col["loss_count"].sum().clamp_min(1)),
        "stop": bool(col["stop"].max() > 0),
        "save_now": bool(col["save_now"][0] > 0),  # rank 0's clock decides for everyone
        "nonfinite_loss": int(col["nonfinite_loss"].sum()),
        "keys_crc": int(col["keys_crc"].sum()),
        "bin_sum": table[:, n : n + _NB].sum(0).tolist(),
        "bin_count": table[:, n + _NB : n + 2 * _NB].sum(0).tolist(),
        "data": dict(zip(DATA_FIELDS, table[:, n + 2 * _NB :].sum(0).tolist())),  # loader counts, all ranks
        "data_epoch": int(col["data_epoch"].max()),
    }


def gather_keys(keys: list[str]) -> list[list[str]]:
    """Collective: every rank's sample keys of this step, by rank (the debug record of which rank read
    which sample; one gather of Python objects, so only with telemetry.log_sample_keys)."""
    out: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(out, keys)
    return out


def step_metrics(g: dict[str, Any], stats: StepStats, *, lr: float, grad_norm: float | None, samples_seen: int,
                 skipped: int, peak: float | None, world: int, mem: float,
                 samples_per_epoch: int | None = None, skip_fraction: float | None = None) -> dict[str, float]:
    """Loggable metrics of one step from the gathered stats (names from evaluation.metrics) and this
    rank's own `stats` (family extras)."""
    dt = g["step_time_max"]  # the step is as slow as its slowest rank
    out = {
        M.LOSS: g["loss"],
        M.LR: lr,
        M.SAMPLES_SEEN: samples_seen,
        M.SKIPPED_STEPS: skipped,
        M.IMAGES_PER_S: g["samples"] / dt,
        M.TOKENS_PER_S: g["tokens"] / dt,
        M.DATA_WAIT_FRAC: g["data_wait_frac"],
        M.STEP_TIME_SPREAD: g["step_time_spread"],
        M.MEM_GB: mem,
        "perf/step_time_s": dt,
        "data/keys_crc": g["keys_crc"],  # identical across an exact resume
    }
    if grad_norm is not None:
        out[M.GRAD_NORM] = grad_norm
    if peak:
        out[M.MFU] = g["flops"] / dt / (peak * world)
    # family-specific scalars: rank-local means over this step's micro-batches (not gathered)
    for k, v in stats.extras.items():
        out[f"family/{k}"] = v / max(1, stats.micro_batches)
    for i, (s, c) in enumerate(zip(g["bin_sum"], g["bin_count"])):
        if c > 0:
            out[M.LOSS_T[i]] = s / c
    out.update(data_metrics(g, samples_per_epoch, skip_fraction))
    return out


def data_metrics(g: dict[str, Any], samples_per_epoch: int | None, skip_fraction: float | None) -> dict[str, float]:
    """The `data/*` metrics from the gathered loader counts (cumulative, summed over ranks)."""
    d = g["data"]
    out = {M.skipped_key(r): d[f"skipped/{r}"] for r in SKIP_REASONS}
    out[M.DATA_SKIPPED] = sum(out.values())
    errors = {M.shard_errors_key(r): d[f"shard_errors/{r}"] for r in SHARD_ERRORS}
    out.update(errors)
    out[M.DATA_SHARD_ERRORS] = sum(errors.values())
    out[M.DATA_EPOCH] = g["data_epoch"]
    if samples_per_epoch:
        out[M.DATA_SAMPLES_PER_EPOCH] = samples_per_epoch
    if d["budget"] > 0:
        out[M.DATA_PACKING] = d["tokens"] / d["budget"]
    if d["batches"] > 0:
        out[M.DATA_TOKENS_PER_MICRO] = d["tokens"] / d["batches"]
    if skip_fraction is not None:
        out[M.DATA_SKIP_FRACTION] = skip_fraction
    return out


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Paste images of possibly different sizes into a grid on white, row by row."""
    rows = [images[i : i + cols] for i in range(0, len(images), cols)]
    width = max(sum(im.width for im in r) for r in rows)
    height = sum(max(im.height for im in r) for r in rows)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for r in rows:
        x = 0
        for im in r:
            grid.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in r)
    return grid


class Telemetry:
    """Rank-0 sinks: log.jsonl, W&B, tqdm. On other ranks every method is a no-op."""

    def __init__(self, cfg: RunConfig, rank: int, start_step: int, git: dict[str, Any]) -> None:
        self.active = rank == 0
        self.cfg = cfg
        self.wandb = None
        self.bar = None
        if not self.active:
            return
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "log.jsonl").open("a")
        self._write({"event": "start", "step": start_step, "git": git, "config": to_dict(cfg)})
        if cfg.telemetry.wandb_mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id.txt"  # one W&B run across resumes
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.telemetry.wandb_project, name=cfg.run.name, id=run_id, resume="allow",
                dir=str(run_dir), mode=cfg.telemetry.wandb_mode,
                config={**to_dict(cfg), "git": git}, settings=wandb.Settings(console="off"),
            )
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.run.name,
                        dynamic_ncols=True, smoothing=0.1)

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def log(self, step: int, metrics: dict[str, float], write: bool) -> None:
        """Advance the bar every step; write jsonl/W&B when `write` (every telemetry.log_every)."""
        if not self.active:
            return
        self.bar.update(1)
        loss = metrics.get(M.LOSS, math.nan)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics.get(M.LR, 0):.2e}", refresh=False)
        if write:
            self.record(step, metrics)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Write metrics of `step` to log.jsonl and W&B."""
        if not self.active:
            return
        self._write({"step": step, "time": time.time(), **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A one-off record (checkpoint written, run stopped, ...) in the jsonl and on the console."""
        if not self.active:
            return
        self._write({"event": name, "step": step, **fields})
        tqdm.write(f"[step {step}] {name} " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def grid(self, step: int, grid: Image.Image) -> Path | None:
        if not self.active:
            return None
        path = self.cfg.run_dir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({M.SAMPLE_GRID: wandb.Image(str(path))}, step=step)
        return path

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
