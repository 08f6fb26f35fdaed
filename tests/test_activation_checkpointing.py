"""Activation checkpointing: the `train.activation_checkpointing` values (off, full, a fraction,
every K-th block), the same numbers with less saved memory in the model, and the same losses in a
real 1-rank DeepSpeed training run on the tiny world (lumina_illus.train.tiny_run)."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_train_resume import finish, launch, read_log  # the trainer's run harness

from lumina_illus.config import ConfigError, checkpointed_blocks, config_from_raw, normalize_checkpointing
from lumina_illus.models.activation_memory import SavedActivations
from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

torch.set_num_threads(1)


def test_setting_values_and_block_choice():
    for off in (False, "off", 0, 0.0):
        assert normalize_checkpointing(off) is False
    for full in (True, "full", 1, 1.0, "every_1"):
        assert normalize_checkpointing(full) is True
    assert normalize_checkpointing(0.5) == 0.5 and normalize_checkpointing("every_03") == "every_3"
    for bad in (1.5, -0.1, "every_0", "every_x", "half", "every2"):
        with pytest.raises(ValueError, match="'activation_checkpointing' = "):
            normalize_checkpointing(bad)
    assert checkpointed_blocks(0.5, 6) == [False, True] * 3
    assert sum(checkpointed_blocks(0.3, 30)) == 9 and sum(checkpointed_blocks(0.7, 30)) == 21  # float-exact counts
    assert checkpointed_blocks("every_3", 7) == [True, False, False, True, False, False, True]  # torchtitan's layer ids % K == 0
    assert checkpointed_blocks(True, 3) == [True] * 3 and checkpointed_blocks("off", 2) == [False] * 2

    raw = {"family": "lumina2", "model": {"arch": {"preset": "tiny"}}}
    for given, stored in ((True, True), ("full", True), ("off", False), (0.25, 0.25), ("every_2", "every_2")):
        cfg = config_from_raw({**raw, "train": {"activation_checkpointing": given}}, "run.yaml")
        assert cfg.train.activation_checkpointing == stored
    with pytest.raises(ConfigError, match=r"run.yaml: invalid 'train': 'activation_checkpointing' = 'most' must be"):
        config_from_raw({**raw, "train": {"activation_checkpointing": "most"}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"invalid 'model.arch': 'activation_checkpointing' = 2.0 must be in \[0, 1\]"):
        config_from_raw({**raw, "model": {"arch": {"preset": "tiny", "activation_checkpointing": 2.0}}}, "run.yaml")


def test_selective_checkpointing_same_numbers_less_memory():
    """Every setting gives the plain numbers (outputs and gradients within 1e-6) and keeps fewer
    activations than the one before: off > every other block > full."""
    torch.manual_seed(0)
    model = NextDiT(nextdit_tiny(n_layers=4))  # 6 blocks: context refiner, noise refiner, 4 main layers
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(16, 8, 6, generator=g), torch.randn(16, 6, 10, generator=g)]
    feats, t = torch.randn(2, 5, 32, generator=g), torch.tensor([0.3, 0.7])
    mask = torch.arange(5)[None] < torch.tensor([5, 3])[:, None]

    def step(spec):
        model.set_activation_checkpointing(spec)
        model.zero_grad()
        with SavedActivations(model) as saved:
            out = model(latents, t, feats, mask)
        sum(o.square().sum() for o in out).backward()
        return saved.nbytes, [*out, *(p.grad.clone() for p in model.parameters() if p.requires_grad)]

    base_bytes, base = step(False)
    saved = {}
    for spec in ("every_2", 0.5, True):
        saved[spec], got = step(spec)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert base_bytes > saved["every_2"] > saved[True] and base_bytes > saved[0.5] > saved[True], (base_bytes, saved)
    assert saved[True] < 0.25 * base_bytes  # what is left: block inputs and the layers around the blocks


COMMON = ["train.max_steps=5", "train.global_batch=4", "train.micro_batch=2", "train.grad_accum=2",
          "checkpoint.every_steps=0", "checkpoint.resume=none"]


def run_losses(world, name: str, *overrides: str) -> tuple[list[tuple[float, float]], str, dict]:
    """One 1-rank run of the tiny world: ([(loss, grad norm) per step], its output, its config.yaml)."""
    proc = launch(world, f"run.name={name}", *COMMON, *overrides, ranks=1, launcher=["bash"])
    out = finish(proc, timeout=300)
    assert proc.returncode == 0, out[-3000:]
    run_dir = world.parent / "runs" / name
    steps, _ = read_log(run_dir)
    losses = [(steps[s]["train/loss"], steps[s]["train/grad_norm"]) for s in sorted(steps)]
    return losses, out, yaml.safe_load((run_dir / "config.yaml").read_text())


def test_real_training_run_same_losses_with_checkpointing(world):
    """1 rank of real DeepSpeed (ZeRO-2, fp32) on the tiny world, 5 steps of 2 micro-batches of 2
    images: per-step losses and grad norms with full and selective checkpointing equal the run without
    (within 1e-6), and config.yaml names the attention backend that ran."""
    runs = {}
    for name, spec, recompute in (("ac_off", "off", 0), ("ac_full", "full", 4), ("ac_every2", "every_2", 2)):
        runs[name], out, saved = run_losses(world, name, f"train.activation_checkpointing={spec}")
        assert saved["model"]["arch"]["attention"] == "sdpa"
        assert f"attention backend sdpa (asked: auto), activation checkpointing {recompute}/4 blocks" in out
    assert len(runs["ac_off"]) == 5
    for name in ("ac_full", "ac_every2"):
        for (loss, gn), (loss0, gn0) in zip(runs[name], runs["ac_off"]):
            assert abs(loss - loss0) <= 1e-6 and abs(gn - gn0) <= 1e-6, (name, runs[name], runs["ac_off"])


@pytest.mark.slow
def test_real_training_run_with_compiled_blocks(world):
    """model.compile under DeepSpeed with selective checkpointing: the losses of the eager run (1e-5);
    about a minute of inductor compilation when its cache is cold."""
    eager, _, _ = run_losses(world, "eager_every2", "train.activation_checkpointing=every_2")
    compiled, out, saved = run_losses(world, "compiled_every2", "train.activation_checkpointing=every_2",
                                      "model.compile=true")
    assert "compile True" in out and saved["model"]["compile"] is True
    for (loss, gn), (loss0, gn0) in zip(compiled, eager, strict=True):
        assert abs(loss - loss0) <= 1e-5 and abs(gn - gn0) <= 1e-5, (compiled, eager)
