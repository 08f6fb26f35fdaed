"""Deterministic validation loss (lumina_illus/train/validation.py, eval/val_loss.py): the same weights
give bit-identical numbers twice and on 1 or 2 ranks; held-out shards that are training shards are
refused; a 2-rank training run logs val/loss per t-bin and eval/val_loss.py gives the same numbers from
the exported checkpoint afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import ROOT, finish, launch, read_log  # noqa: E402

from lumina_illus.config import ConfigError, load_config  # noqa: E402
from lumina_illus.data.shards import write_shards  # noqa: E402
from lumina_illus.evaluation import metrics as M  # noqa: E402
from lumina_illus.families import get_family  # noqa: E402
from lumina_illus.train.validation import ValidationSet, summarize  # noqa: E402


@pytest.fixture(scope="module")
def val_shards(world: Path) -> str:
    rng = np.random.default_rng(7)
    samples = [{"__key__": f"v{i}", "png": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                "json": {"tags": {"general": ["red" if i % 2 else "cat"]}}} for i in range(5)]
    samples.append({"__key__": "broken", "png": b"not an image", "json": {"tags": {"general": ["x"]}}})
    write_shards(samples, world.parent / "val", 2, prefix="val")  # 3 shards of 2
    return str(world.parent / "val" / "val-*.tar")


def test_same_numbers_twice_and_on_one_or_two_ranks(world: Path, val_shards: str) -> None:
    cfg = load_config(world, [f"validation.shards=[{val_shards}]", "validation.t_values=[0.1, 0.5, 0.93]",
                              "validation.micro_batch=2"])
    torch.manual_seed(0)
    parts = get_family("lumina2").build_training(cfg, torch.device("cpu"))
    one = ValidationSet(cfg, 0, 1)
    a = one.evaluate(parts.module, parts.prepare)
    b = one.evaluate(parts.module, parts.prepare)
    assert a == b  # bit-identical
    assert a[M.VAL_SAMPLES] == 5 and a[M.VAL_SKIPPED] == 1  # the broken sample is counted, not evaluated
    assert set(a) == {M.VAL_LOSS, M.VAL_SAMPLES, M.VAL_SKIPPED, "val/loss_t1", "val/loss_t5", "val/loss_t9"}
    # two ranks, each its own shards: the same numbers once the rows are put together
    ranks = [ValidationSet(cfg, r, 2) for r in range(2)]
    assert {it.shard for it in ranks[0].items} == {0, 2} and {it.shard for it in ranks[1].items} == {1}
    rows = [row for v in ranks for row in v.losses(parts.module, parts.prepare)]
    assert summarize(sorted(rows), {"corrupt_image": 1}) == a
    # the first N samples only (from the manifest), and other weights give other numbers
    assert ValidationSet(cfg.__class__(**{**cfg.__dict__, "validation": cfg.validation.__class__(
        **{**cfg.validation.__dict__, "samples": 3})}), 0, 1).items[-1].key == "v2"
    with torch.no_grad():  # every weight (the zero-initialised final layer would hide one changed weight)
        for w in parts.module.dit.parameters():
            w.add_(0.01)
    assert one.evaluate(parts.module, parts.prepare)[M.VAL_LOSS] != a[M.VAL_LOSS]


def test_sdxl_fixed_t_maps_to_the_nearest_timestep() -> None:
    from lumina_illus.objectives.diffusion import DiffusionConfig, NoiseSchedule

    s = NoiseSchedule.from_config(DiffusionConfig(prediction="v_prediction", zero_terminal_snr=True))
    ts = s.timesteps_for(torch.tensor([0.0, 0.3, 0.5, 0.97, 1.0]))
    all_t = s.lumina_t(torch.arange(1000))
    for t, k in zip([0.0, 0.3, 0.5, 0.97, 1.0], ts.tolist()):  # no neighbouring timestep is nearer
        for n in (k - 1, k + 1):
            if 0 <= n < 1000:
                assert abs(float(all_t[k]) - t) <= abs(float(all_t[n]) - t)
    assert abs(float(all_t[ts[2]]) - 0.5) < 2e-3  # the schedule is dense enough to hit mid-range t closely
    assert ts[0] == 999 and ts[-1] == 0  # pure noise is the last DDPM step, clean data the first


def test_validation_shards_that_are_training_shards_are_refused(world: Path) -> None:
    shard = str(world.parent / "shards" / "t-000000.tar")
    with pytest.raises(ConfigError, match="validation.shards overlaps data.shards.*t-000000.tar"):
        ValidationSet(load_config(world, [f"validation.shards=[{shard}]"]), 0, 1)
    with pytest.raises(ValueError, match="every_steps > 0"):
        load_config(world, ["validation.every_steps=2"])


@pytest.mark.slow
def test_training_logs_val_loss_and_the_cli_reproduces_it(world: Path, val_shards: str) -> None:
    run_dir = world.parent / "runs" / "val"
    v = [f"validation.shards=[{val_shards}]", "validation.every_steps=3"]
    proc = launch(world, "run.name=val", *v, "checkpoint.export_dtype=fp32", "checkpoint.every_steps=3")
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    steps, _ = read_log(run_dir)
    assert M.VAL_LOSS in steps[3] and M.VAL_LOSS in steps[6] and M.VAL_LOSS not in steps[4]
    assert steps[6][M.VAL_SAMPLES] == 5 and steps[6][M.VAL_SKIPPED] == 1
    assert steps[3][M.VAL_LOSS] != steps[6][M.VAL_LOSS]
    # the CLI, one process, on the step-6 export: the numbers the 2-rank run logged, bit for bit
    r = subprocess.run([sys.executable, "eval/val_loss.py", str(run_dir / "ckpt" / "step_0000006"),
                        "--out", str(run_dir / "val.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((run_dir / "val.json").read_text())[0]
    for k in (M.VAL_LOSS, *M.VAL_LOSS_T):
        assert got[k] == steps[6][k], k
    assert "val/loss" in r.stdout


def test_sdxl_validation_is_deterministic_and_world_size_free(tmp_path: Path, val_shards: str) -> None:
    from test_sdxl_train import make_sdxl_world

    cfg = load_config(make_sdxl_world(tmp_path), [f"validation.shards=[{val_shards}]",
                                                  "validation.t_values=[0.05, 0.55, 0.95]"])
    torch.manual_seed(0)
    parts = get_family("sdxl").build_training(cfg, torch.device("cpu"))
    a = ValidationSet(cfg, 0, 1).evaluate(parts.module, parts.prepare)
    assert a == ValidationSet(cfg, 0, 1).evaluate(parts.module, parts.prepare)
    rows = [row for r in range(2) for row in ValidationSet(cfg, r, 2).losses(parts.module, parts.prepare)]
    assert summarize(sorted(rows), {"corrupt_image": 1}) == a
    # logged in the trainer's t convention: each t lands in its own bin via the nearest DDPM timestep
    assert {k for k in a if k.startswith("val/loss_t")} == {"val/loss_t0", "val/loss_t5", "val/loss_t9"}
