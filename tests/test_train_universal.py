"""Resuming on another number of ranks, end to end with real DeepSpeed CPU ranks on the tiny world of
test_train_resume.py: a 2-rank run checkpoints at step 3, then

- `load1` / `load2`: this file run as a script (`__main__` below) builds the run exactly as train.py
  does (lumina_illus.train.loop.build_run) resuming from that checkpoint, with 1 rank (conversion to
  DeepSpeed's universal format + universal load) and with 2 ranks (the ordinary load), and writes
  what it loaded: an export of the weights and EMA (Checkpointer.save) and every parameter's fp32
  master weight, Adam exp_avg and exp_avg_sq and the Adam step. The 1-rank load must equal the 2-rank
  load exactly and its export must equal the 2-rank run's own export at step 3, bit for bit;
- a 1-rank training run resumed from it (train.grad_accum doubled, same global batch) continues at
  step 4 with the right samples_seen and finite losses close to a 2-rank continuation;
- a state the converter cannot read stops the run with the converter's reason and leaves no folder.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_resume import finish, launch, read_log


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (or exist on one side only)."""
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_resume_two_rank_state_on_one_rank(world, zero):
    runs = world.parent / "runs"
    common = (f"train.zero_stage={zero}", "checkpoint.export_dtype=fp32")
    src = launch(world, f"run.name=u{zero}_src", *common, "train.max_steps=3")
    out = finish(src, timeout=600)
    assert src.returncode == 0, out[-3000:]
    step3 = runs / f"u{zero}_src" / "ckpt" / "step_0000003"
    resume = f"checkpoint.resume={step3}"
    one_rank = ("train.grad_accum=4",)  # global batch 4 = micro 1 x accum 4 x 1 rank

    # what the engines hold after loading: 1 rank (universal) vs 2 ranks (ordinary load)
    load1 = launch(world, f"run.name=u{zero}_load1", *common, resume, *one_rank, script=__file__,
                   launcher=[sys.executable])
    out1 = finish(load1, timeout=600)
    assert load1.returncode == 0, out1[-3000:]
    assert "converting" in out1 and "universal" in out1
    ds = step3 / "ds"
    assert (ds / "state_universal" / "zero" / "optimizer_state.pt").is_file()
    assert not (ds / ".tmp_universal").exists()
    load2 = launch(world, f"run.name=u{zero}_load2", *common, resume, script=__file__)
    out2 = finish(load2, timeout=600)
    assert load2.returncode == 0, out2[-3000:]
    assert "converting" not in out2  # same world size: the ordinary load, no conversion
    got1 = load_file(str(runs / f"u{zero}_load1" / "loaded.safetensors"))
    got2 = load_file(str(runs / f"u{zero}_load2" / "loaded.safetensors"))
    assert any(k.startswith("exp_avg/") for k in got1) and float(got1["adam_step"]) == 3
    assert got1["adam_step"].item() == got2["adam_step"].item()
    assert not _same(got1, got2), _same(got1, got2)[:5]  # fp32 copies: exact
    assert any(float(v.abs().max()) > 0 for k, v in got1.items() if k.startswith("exp_avg/"))
    # the weights (and EMA) the 1-rank run starts from are the exported weights of step 3, exactly
    for rel in ("lumina2.safetensors", "ema/lumina2.safetensors"):
        a = load_file(str(runs / f"u{zero}_load1" / "ckpt" / "step_0000003" / rel))
        b = load_file(str(step3 / rel))
        assert not _same(a, b), (rel, _same(a, b)[:5])

    # training continues on 1 rank (reusing the conversion) and on 2 ranks (the reference)
    ref = launch(world, f"run.name=u{zero}_ref", *common, resume)
    out = finish(ref, timeout=600)
    assert ref.returncode == 0, out[-3000:]
    one = launch(world, f"run.name=u{zero}_one", *common, resume, *one_rank, launcher=["bash"])
    out = finish(one, timeout=600)
    assert one.returncode == 0, out[-3000:]
    assert "reusing" in out and "converting" not in out
    ref_steps, _ = read_log(runs / f"u{zero}_ref")
    steps, events = read_log(runs / f"u{zero}_one")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 3 and resumed[0]["samples_seen"] == 12
    assert resumed[0]["universal"] is True
    assert sorted(steps) == sorted(ref_steps) == [4, 5, 6]
    for s in (4, 5, 6):
        assert steps[s]["train/samples_seen"] == ref_steps[s]["train/samples_seen"] == 4 * s
        assert math.isfinite(steps[s]["train/loss"])
    # Same weights and optimizer state (checked exactly above), but each step's 4 samples are split
    # over other ranks and get re-seeded noise and t draws, so the losses are not the reference's
    # to float precision, only to the spread of a 4-sample flow-matching loss: here steps 4-6 range
    # 0.95-1.02 in either run and the means differ by 2%. 10% on the mean of the 3 steps leaves room
    # for that noise; the exact state comparison above is what proves the optimizer state loaded.
    mean = sum(steps[s]["train/loss"] for s in (4, 5, 6)) / 3
    ref_mean = sum(ref_steps[s]["train/loss"] for s in (4, 5, 6)) / 3
    assert abs(mean - ref_mean) <= 0.10 * ref_mean, (mean, ref_mean)
    state = json.loads((runs / f"u{zero}_one" / "ckpt" / "step_0000006" / "ds" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == 6 and state["samples_seen"] == 24

    if zero == 2:  # a state the converter cannot read: every rank stops with the reason, nothing half kept
        bad = runs / "broken" / "step_0000003"
        shutil.copytree(step3, bad)
        shutil.rmtree(bad / "ds" / "state_universal")
        for f in (bad / "ds" / "state").glob("*optim_states.pt"):
            f.unlink()
        proc = launch(world, "run.name=u_bad", *common, f"checkpoint.resume={bad}", *one_rank, launcher=["bash"])
        out = finish(proc, timeout=600)
        assert proc.returncode != 0
        assert "saved by 2 ranks, this run has 1; converting" in out and "failed" in out
        assert "ds_to_universal" in out and "Resume with 2 ranks" in out
        assert not (bad / "ds" / "state_universal").exists() and not (bad / "ds" / ".tmp_universal").exists()


def _dump_loaded_state(argv: list[str]) -> None:
    """`python tests/test_train_universal.py CONFIG --override ...` (any launcher): build and resume
    the run as train.py does, export the loaded weights and EMA at the resume step and write every
    parameter's fp32 master weight and Adam moments to <run_dir>/loaded.safetensors."""
    import os

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from lumina_illus.config import load_config
    from lumina_illus.train.loop import build_run

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train import parse_args

    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(args.config, args.override)
    b = build_run(cfg)
    assert b.resume is not None, "give checkpoint.resume"
    b.ckpt.save(b.engine, b.state, resume_state=False, export=True, parts=b.parts, ema=b.ema, loader=b.loader,
                generators=b.generators)
    # ZeRO-1/2 link the Adam moments to the parameters' fragments at the first step() only, and an
    # ordinary load does not link them (a universal load does): link them for the readers below
    link = getattr(b.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    dump: dict[str, torch.Tensor] = {}
    for name, p in b.engine.module.named_parameters():  # collective under ZeRO
        if not p.requires_grad:
            continue
        dump[f"fp32/{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            dump[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    steps = {float(s["step"]) for s in b.engine.optimizer.optimizer.state.values() if "step" in s}
    assert len(steps) == 1, steps
    dump["adam_step"] = torch.tensor(steps.pop())
    if b.env.rank == 0:
        save_file(dump, str(cfg.run_dir / "loaded.safetensors"))


if __name__ == "__main__":
    _dump_loaded_state(sys.argv[1:])
