"""Data health end to end: a 2-rank DeepSpeed run (CPU, gloo) on the tiny training world plus a shard
of bad samples and a truncated shard logs the skip counts per reason, summed over ranks, in log.jsonl;
with data.max_skip_fraction exceeded the run writes a checkpoint and stops on every rank with the top
reasons and example shard/key pairs."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import finish, launch, metric_rows_per_step, read_log  # noqa: E402

from lumina_illus.data.shards import write_shards  # noqa: E402
from lumina_illus.evaluation import metrics as M  # noqa: E402


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bad_shards(folder: Path) -> list[str]:
    """A shard with 4 bad and 4 good samples, and a shard of 8 cut inside its 5th sample."""
    tags = {"tags": {"general": ["red"]}}
    good = [{"__key__": f"g{i}", "png": _png(i), "json": tags} for i in range(12)]
    bad = [{"__key__": "corrupt1", "png": b"not an image" * 10, "json": tags},
           {"__key__": "corrupt2", "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "json": tags},
           {"__key__": "empty", "png": b"", "json": tags},
           {"__key__": "badjson", "png": _png(99), "json": b"{oops"}]
    write_shards(bad + good[:4], folder / "bad", 8, prefix="bad")
    write_shards(good[4:], folder / "cut", 8, prefix="cut")
    tar = folder / "cut" / "cut-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(b"g8.png") + 700])  # inside g8's image: g8..g11 lost
    return [str(folder / "bad" / "bad-000000.tar"), str(tar)]


def out_time(steps: dict[int, dict]) -> float:
    """Seconds between the first and the last logged step, plus one step: an upper bound of step time."""
    t = sorted(s["time"] for s in steps.values())
    return t[-1] - t[0] + max(s["perf/step_time_s"] for s in steps.values()) + 1e-6


@pytest.fixture(scope="module")
def shards(world: Path) -> str:
    extra = _bad_shards(world.parent / "extra")
    return "data.shards=[" + ", ".join([str(world.parent / "shards" / "t-*.tar"), *extra]) + "]"


@pytest.mark.slow
def test_skip_counts_per_reason_reach_the_log(world: Path, shards: str) -> None:
    run_dir = world.parent / "runs" / "health"
    # 16 steps of 4 = 64 samples: more than the 56 good samples of an epoch, so every shard was read
    proc = launch(world, "run.name=health", shards, "train.max_steps=16", "telemetry.log_every=1",
                  "checkpoint.every_steps=0", "data.max_skip_fraction=1.0")
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    steps, _ = read_log(run_dir)
    last = steps[16]
    assert last[M.DATA_SAMPLES_PER_EPOCH] == 48 + 8 + 8  # manifests
    assert last[M.DATA_EPOCH] >= 1
    # at least one epoch of every bad input, at most two (summed over both ranks)
    for key, once in [(M.skipped_key("corrupt_image"), 2), (M.skipped_key("empty_file"), 1),
                      (M.skipped_key("bad_json"), 1), (M.skipped_key("truncated_tar"), 4),
                      (M.shard_errors_key("truncated_tar"), 1)]:
        assert once <= last[key] <= 2 * once, (key, last[key])
    assert last[M.DATA_SKIPPED] == sum(last[M.skipped_key(r)] for r in
                                       ("corrupt_image", "empty_file", "bad_json", "truncated_tar"))
    assert last[M.skipped_key("missing_caption")] == 0
    assert 0 < last[M.DATA_SKIP_FRACTION] < 0.5
    # the counts only grow, and were there before the end
    series = [steps[s][M.DATA_SKIPPED] for s in sorted(steps)]
    assert series == sorted(series) and series[0] < series[-1]
    assert last[M.DATA_PACKING] == 1.0 and last[M.DATA_TOKENS_PER_MICRO] == 16  # bucket mode, 64x64 -> 16 tokens
    # the export carries the compute and wall-clock spent, for curves against them (char_recall --x)
    meta = json.loads((run_dir / "ckpt" / "step_0000016" / "meta.json").read_text())
    assert meta["flops_seen"] > 0 and 0 < meta["train_seconds"] < out_time(steps)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 100])  # the stop step is a logging step / one log_every skips
def test_too_many_bad_samples_stop_every_rank_with_a_checkpoint(world: Path, shards: str, log_every: int) -> None:
    run_dir = world.parent / "runs" / f"toobad{log_every}"
    proc = launch(world, f"run.name=toobad{log_every}", shards, "train.max_steps=40",
                  f"telemetry.log_every={log_every}", "checkpoint.every_steps=0", "data.max_skip_fraction=0.02",
                  "data.skip_window=24")
    out = finish(proc)
    assert proc.returncode == 3, out[-3000:]
    steps, events = read_log(run_dir)
    stop = [e for e in events if e["event"] == "stopped_bad_data"]
    assert len(stop) == 1
    step = stop[0]["step"]
    assert step < 40 and steps[step][M.DATA_SKIP_FRACTION] > 0.02
    # each logged step's metrics are recorded once, and the stop step's always
    logged = [s for s in range(1, step + 1) if s % log_every == 0 or s == step]
    assert metric_rows_per_step(run_dir) == dict.fromkeys(logged, 1)
    assert (run_dir / "ckpt" / "latest").read_text() == f"step_{step:07d}"  # resumable from there
    assert "data.max_skip_fraction=2.00%" in out and "data.max_skip_fraction (now 0.02)" in out
    # the message names the top reasons and example shard/key pairs
    verdict = out[out.index("error: data:"):]
    assert any(r in verdict for r in ("corrupt_image", "empty_file", "bad_json", "truncated_tar"))
    assert "shard=" in verdict and ("bad-000000.tar key=" in verdict or "cut-000000.tar" in verdict)
