"""Preemption and divergence, end to end on the tiny world of test_train_resume.py:

- SIGTERM to every rank (what Slurm does) under `deepspeed --no_python launch/train_lu.sh`: the step
  finishes, a checkpoint is written, every process exits 0; W&B offline files land in the run dir, and
  sample grids and the in-training character recall (evaluation's toy WD tagger) run on the way;
  resuming it on 1 rank without fixing the batch arithmetic stops with the numbers to use.
- a diverging run (`bash launch/train_lu.sh`, one rank, absurd LR): non-finite steps are skipped and
  counted, the weights stay finite, and `train.max_bad_steps` in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_toys import build_toy_tagger  # noqa: E402
from test_train_resume import ROOT, _wait_for_step, finish, launch, metric_rows_per_step, read_log  # noqa: E402


@pytest.mark.slow
def test_sigterm_finishes_step_checkpoints_and_exits_zero(world):
    run_dir = world.parent / "runs" / "term"
    tagger = build_toy_tagger(world.parent / "tagger")
    chars = world.parent / "characters.csv"
    chars.write_text("name,tag,prompt,train_samples\nAlice,alice,red girl,10\n")
    proc = launch(world, "run.name=term", "train.max_steps=200", "telemetry.wandb_mode=offline",
                  "eval.char_recall_every=2", f"eval.characters={chars}", f"eval.tagger={tagger}",
                  "sampling.every_steps=2", "sampling.prompts=[red, cat]", "sampling.sizes=[[64, 64], [128, 64]]",
                  "sampling.steps=2",
                  launcher=["deepspeed", "--no_python", "--num_gpus", "2", "--master_port", "29733"])
    _wait_for_step(run_dir, 2, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train_lu.sh" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())
             and "python" in p.name()]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    stop = [e for e in events if e["event"] == "stopped_by_signal"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM"
    last = max(steps)
    assert 2 <= last < 200 and stop[0]["step"] == last
    latest = (run_dir / "ckpt" / "latest").read_text()
    assert latest == f"step_{last:07d}"
    state = json.loads((run_dir / "ckpt" / latest / "ds" / "trainer_state.json").read_text())
    assert state["step"] == last and state["samples_seen"] == 4 * last
    assert any((run_dir / "wandb").glob("offline-run-*")), "W&B offline run not in the run dir"
    # sample grid: one row per prompt, one column per (width, height)
    grid = Image.open(run_dir / "samples" / "step_0000002.png")
    assert grid.size == (64 + 128, 64 + 64)
    # in-training character recall through lumina_illus.evaluation (random weights: any value in [0, 1])
    assert 0.0 <= steps[2]["eval/char_recall"] <= 1.0
    # resuming these 2-rank states on 1 rank works (test_train_universal.py) once the batch adds up:
    # with the config's grad_accum the run stops before building anything and names the fix
    one = launch(world, "run.name=term", "train.max_steps=200", launcher=["bash"])
    out = finish(one)
    assert one.returncode != 0
    assert "train.micro_batch=1 x train.grad_accum=2 x world_size=1 = 2" in out
    assert "with 1 ranks use train.grad_accum=4" in out
    assert not (run_dir / "ckpt" / latest / "ds" / "state_universal").exists()


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(world):
    run_dir = world.parent / "runs" / "nan"
    # lr 1e30: step 1 applies (finite grads), its weights overflow every later forward to inf/nan
    proc = launch(world, "run.name=nan", "optim.lr=1e30", "optim.warmup_steps=0", "train.global_batch=2",
                  "train.max_bad_steps=3", "train.max_steps=20", "checkpoint.every_steps=0",
                  "checkpoint.export_dtype=fp32", launcher=["bash"])
    out = finish(proc)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in out and "train.max_bad_steps=3" in out
    steps, events = read_log(run_dir)
    skipped = [e for e in events if e["event"] == "skipped_step"]
    assert [e["step"] for e in skipped] == [2, 3, 4]
    assert steps[4]["train/skipped_steps"] == 3 and steps[1]["train/skipped_steps"] == 0
    assert metric_rows_per_step(run_dir) == dict.fromkeys([1, 2, 3, 4], 1)  # the stop step's metrics once too
    # the run stopped at step 4 with a checkpoint whose weights are step 1's: finite
    assert (run_dir / "ckpt" / "latest").read_text() == "step_0000004"
    weights = load_file(str(run_dir / "ckpt" / "step_0000004" / "lumina2.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(float(w.abs().max()) for w in weights.values()) > 1e20  # step 1 really applied lr 1e30


def test_launcher_rejects_a_config_of_another_family(world):
    r = subprocess.run([sys.executable, "launch/train_sdxl.sh", str(world)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "family is 'lumina2' but this launcher trains 'sdxl'" in r.stderr and "launch/train_lu.sh" in r.stderr


@pytest.mark.slow
def test_batch_arithmetic_mismatch_stops_every_rank_with_the_numbers(world):
    proc = launch(world, "run.name=arith", "train.grad_accum=3")
    out = finish(proc)
    assert proc.returncode != 0
    assert out.count("train.micro_batch=1 x train.grad_accum=3 x world_size=2 = 6") == 2  # both ranks
    assert "use train.grad_accum=2" in out


def test_help_works_three_ways():
    for cmd in (["bash", "launch/train_lu.sh", "--help"], [sys.executable, "launch/train_lu.sh", "--help"],
                ["./launch/train_sdxl.sh", "--help"], [sys.executable, "train.py", "--help"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--override" in r.stdout, (cmd, r.stderr)
