"""A LoRA run end to end with 2 real CPU ranks (DeepSpeed ZeRO-2, EMA on) on the tiny Lumina world of
test_train_resume: SIGKILLed after its first checkpoint and resumed, it logs the losses and data of an
uninterrupted run and ends with the same adapters and EMA bit for bit; the resume state, the EMA and
the exports hold adapters only (the frozen base is rebuilt from the config, never saved).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import _wait_for_step, finish, launch, read_log

from lumina_illus.models.lora import KOHYA_FILE, PEFT_DIR

COMMON = ("lora.enabled=true", "lora.rank=4", "lora.alpha=4", "train.max_steps=8", "checkpoint.every_steps=2",
          "checkpoint.export_dtype=fp32")


def _pretrained_base(folder):
    """A "pretrained" tiny NextDiT: random weights everywhere. A fresh NextDiT zero-initialises its
    output layer and adaLN gates, so no gradient would reach an adapter and every check were vacuous."""
    from lumina_illus.models.checkpoint_io import save_nextdit
    from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

    torch.manual_seed(0)
    dit = NextDiT(nextdit_tiny())
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_nextdit(dit, folder)
    return folder


@pytest.mark.slow
def test_lora_sigkill_and_resume_is_exact_and_saves_adapters_only(world, tmp_path):
    runs = world.parent / "runs"
    common = (*COMMON, f"model.pretrained={_pretrained_base(tmp_path / 'base')}")
    ref = launch(world, "run.name=lora_ref", *common)
    out = finish(ref)
    assert ref.returncode == 0, out[-3000:]
    ref_steps, _ = read_log(runs / "lora_ref")

    run_dir = runs / "lora_kill"
    proc = launch(world, "run.name=lora_kill", *common)
    _wait_for_step(run_dir, 3, proc)  # the checkpoint of step 2 is complete before step 3 logs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed after step 2's checkpoint; a fast machine may have written step 4's or 6's before the kill
    latest = int((run_dir / "ckpt" / "latest").read_text().removeprefix("step_"))
    assert latest in (2, 4, 6), latest
    resumed = launch(world, "run.name=lora_kill", *common)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    assert any(e["event"] == "resumed" and e["step"] == latest for e in events)
    assert sorted(steps) == sorted(ref_steps) == list(range(1, 9))
    for s in steps:
        assert steps[s]["data/keys_crc"] == ref_steps[s]["data/keys_crc"], f"data differs at step {s}"
        assert steps[s]["train/loss"] == ref_steps[s]["train/loss"], f"loss differs at step {s}"

    final, ref_final = run_dir / "ckpt" / "step_0000008", runs / "lora_ref" / "ckpt" / "step_0000008"
    # exports: adapters (kohya file + peft folder), raw and EMA, and no full NextDiT weights
    assert sorted(p.name for p in final.iterdir()) == ["ds", "ema", KOHYA_FILE, PEFT_DIR, "meta.json"]
    for rel in (KOHYA_FILE, f"ema/{KOHYA_FILE}", f"{PEFT_DIR}/adapter_model.safetensors"):
        a, b = load_file(str(final / rel)), load_file(str(ref_final / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    raw, ema = load_file(str(final / KOHYA_FILE)), load_file(str(final / "ema" / KOHYA_FILE))
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert all(raw[k].abs().max() > 0 for k in ups)  # up starts at zero: the adapters trained
    assert all(not torch.equal(raw[k], ema[k]) for k in ups)  # and the EMA averages them on its own
    assert all(k.startswith("lora_unet_") for k in raw)
    # the resume state: the module part and the EMA shards hold adapters only
    ds = final / "ds"
    module = torch.load(ds / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all(".lora_" in k for k in module), [k for k in module if ".lora_" not in k][:3]
    for r in (0, 1):
        assert all(".lora_" in k for k in load_file(str(ds / f"ema_rank_{r:05d}.safetensors")))
