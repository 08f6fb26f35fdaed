"""Exact resume, end to end with 2 real CPU ranks (DeepSpeed launcher, gloo) on the tiny world of
lumina_illus.train.tiny_run (random tiny Gemma-2 and Flux VAE, 48 random 64x64 images in 6 shards):
a run SIGKILLed after step k and resumed logs the same per-step losses and the same data (per-step
CRC of sample keys and captions) as an uninterrupted run, under ZeRO-2 and ZeRO-3. The helpers here
(launch, finish, read_log) are shared with test_train_signals.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def launch(cfg: Path, *overrides: str, ranks: int = 2, script: str = "launch/train_lu.sh",
           launcher: list[str] | None = None) -> subprocess.Popen:
    """Start a training run in its own process group (so a test can kill all of it)."""
    from lumina_illus.train.engine import _free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    if launcher is None:
        launcher = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)]
    args = [*launcher, script, str(cfg)]
    if overrides:
        args += ["--override", *overrides]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.master_port = port  # type: ignore[attr-defined]
    return proc


def shm_pattern(proc: subprocess.Popen) -> str:
    """Glob of the /dev/shm segments DeepSpeed's CPU allreduce creates for the run `proc`, one per rank
    (deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, see train.engine.shm_buffer_path)."""
    return f"deepspeed_allreduce_buffer_*_{proc.master_port}_*"


def shm_segments(proc: subprocess.Popen) -> list[Path]:
    """DeepSpeed CPU allreduce segments left in /dev/shm by the run `proc` (named by its master port)."""
    return sorted(Path("/dev/shm").glob(shm_pattern(proc)))


def shm_mappings(proc: subprocess.Popen) -> dict[str, bool]:
    """The segments matching shm_pattern(proc) that the run's live processes (its session) have mapped,
    read from /proc/<pid>/maps: {segment name: unlinked already (the kernel marks it "(deleted)")}."""
    found: dict[str, bool] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])  # fields after comm: state ppid pgrp session
            maps = (stat.parent / "maps").read_text() if session == proc.pid else ""
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            path = fields[5] if len(fields) == 6 else ""
            deleted = path.endswith(" (deleted)")
            path = path.removesuffix(" (deleted)")
            if path.startswith("/dev/shm/") and fnmatch.fnmatchcase(path[len("/dev/shm/") :], shm_pattern(proc)):
                found[path[len("/dev/shm/") :]] = deleted
    return found


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def read_log(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """log.jsonl -> ({step: metrics of that step, later records overriding}, [event records])."""
    steps: dict[int, dict] = {}
    events = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" in r:
            events.append(r)
        else:
            steps.setdefault(r["step"], {}).update(r)
    return steps, events


def metric_rows_per_step(run_dir: Path) -> Counter[int]:
    """log.jsonl -> {step: number of metric records of that step} (read_log merges them)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return Counter(r["step"] for r in rows if "event" not in r)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    log = run_dir / "log.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if log.is_file() and any(json.loads(x).get("step", 0) >= step and "event" not in json.loads(x)
                                 for x in log.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("zero,te", [(2, False), (3, False), (2, True)], ids=["zero2", "zero3", "zero2-trainable-gemma"])
def test_sigkill_and_resume_reproduces_losses_and_data(world, zero, te):
    name = f"z{zero}" + ("_te" if te else "")
    # sample grids on the way (all ranks sample under ZeRO-3): they must not disturb training
    common = (f"train.zero_stage={zero}", "sampling.every_steps=2", "sampling.prompts=[red]",
              "sampling.sizes=[[64, 64]]", "checkpoint.export_dtype=fp32")
    if te:  # Gemma-2 in the engine with its own LR group, in the EMA, exported as a transformers folder
        common += ("model.text_encoder.trainable=true", "model.text_encoder.lr=1e-4")
    ref = launch(world, f"run.name={name}_ref", *common)
    out = finish(ref)
    assert ref.returncode == 0, out[-3000:]
    ref_steps, _ = read_log(world.parent / "runs" / f"{name}_ref")

    run_dir = world.parent / "runs" / f"{name}_kill"
    proc = launch(world, f"run.name={name}_kill", *common)
    _wait_for_step(run_dir, 4, proc)  # the checkpoint of step 3 is complete before step 4 logs
    # positive control for the leak check below: while the ranks train, they map one allreduce segment
    # per rank under exactly the names shm_segments looks for, already unlinked from /dev/shm
    mapped = shm_mappings(proc)
    assert sorted(name.rsplit("_", 1)[1] for name in mapped) == ["0", "1"], mapped
    assert all(mapped.values()) and shm_segments(proc) == [], mapped
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "ckpt" / "latest").read_text() == "step_0000003"
    # the 66 MB shared-memory allreduce segments are unlinked right after start-up: none survive a
    # finished run or a SIGKILLed one (DeepSpeed alone leaks them into RAM-backed /dev/shm)
    assert shm_segments(ref) == [] and shm_segments(proc) == []
    resumed = launch(world, f"run.name={name}_kill", *common)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    assert any(e["event"] == "resumed" and e["step"] == 3 for e in events)
    assert sorted(steps) == sorted(ref_steps) == list(range(1, 7))
    for s in range(1, 7):
        assert steps[s]["data/keys_crc"] == ref_steps[s]["data/keys_crc"], f"data differs at step {s}"
        assert steps[s]["train/loss"] == ref_steps[s]["train/loss"], f"loss differs at step {s}"
        assert steps[s]["train/samples_seen"] == ref_steps[s]["train/samples_seen"] == 4 * s
    # keep_last=1: only the newest checkpoint keeps its resume state; exports stay
    ckpts = sorted((run_dir / "ckpt").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_0000003", "step_0000006"]
    assert not (ckpts[0] / "ds").exists() and (ckpts[1] / "ds").is_dir()
    for c in ckpts:
        meta = json.loads((c / "meta.json").read_text())
        assert meta["family"] == "lumina2" and meta["samples_seen"] == 4 * int(c.name[5:])
        assert any(c.glob("*.safetensors")) and any((c / "ema").glob("*.safetensors"))
    # the final weights and EMA (restored from its shards) equal the uninterrupted run's, bit for bit
    ref_final = world.parent / "runs" / f"{name}_ref" / "ckpt" / "step_0000006"
    rels = ["lumina2.safetensors", "ema/lumina2.safetensors"]
    if te:
        rels += ["text_encoder/model.safetensors", "ema/text_encoder/model.safetensors"]
        from transformers import AutoModel  # the encoder really trained: it moved away from the base Gemma

        base = AutoModel.from_pretrained(world.parent / "gemma").state_dict()
        trained = load_file(str(ckpts[1] / "text_encoder" / "model.safetensors"))
        assert any(not torch.equal(trained[k], base[k]) for k in trained)
    for rel in rels:
        a, b = load_file(str(ckpts[1] / rel)), load_file(str(ref_final / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert (run_dir / "samples" / "step_0000006.png").is_file()
