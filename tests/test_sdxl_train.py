"""SDXL end to end with 2 real CPU ranks (DeepSpeed launcher, gloo, ZeRO-2): v-prediction + zero-terminal
SNR on the tiny SDXL with both text encoders training; a SIGKILLed run resumes to the same per-step
losses as an uninterrupted one; the exports carry the v_pred/ztsnr markers; sampling the exported EMA
weights with trailing spacing stays finite and shows none of the seed's colour failure modes
(lumina_illus.evaluation.color, the statistics behind eval/color_stats.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_resume import _wait_for_step, finish, launch, read_log  # the trainer's 2-rank harness

from lumina_illus.evaluation.color import failure_flags, folder_stats
from lumina_illus.families import get_family
from lumina_illus.models.tiny_sdxl import make_tiny_sdxl
from lumina_illus.sampling.flow import to_pil
from lumina_illus.train.tiny_run import write_random_shards

STEPS = 6


def make_sdxl_world(folder: Path) -> Path:
    """Tiny SDXL + 48 random 64x64 images in 6 shards + a run config; returns the config path."""
    shards = write_random_shards(folder / "shards", 48)
    make_tiny_sdxl(folder / "sdxl", seed=0)
    cfg = {
        "family": "sdxl",
        "run": {"name": "run", "out_dir": str(folder / "runs"), "seed": 3},
        "model": {
            "pretrained": str(folder / "sdxl"),
            "objective": {"prediction": "v", "zero_terminal_snr": True, "timestep_sampling": "logit_normal"},
            "sampler": {"sampler": "euler", "spacing": "trailing", "steps": 8, "guidance": 4.0, "guidance_rescale": 0.7},
        },
        "data": {
            "shards": [shards], "num_workers": 0, "batching": "bucket",
            "min_area": 64 * 64, "max_area": 64 * 64, "bucket_step": 64,
            "shuffle_buffer": 1,  # same samples in the same order after a resume
            "caption": {"caption_dropout": 0.0, "nl_prob": 0.0},
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2, "text_encoder_lr": 1e-4},
        "train": {"global_batch": 4, "micro_batch": 1, "grad_accum": 2, "max_steps": STEPS, "zero_stage": 2,
                  "precision": "fp32"},
        "ema": {"decay": 0.9},
        "checkpoint": {"every_steps": 3, "every_minutes": 0, "keep_last": 1, "export_layouts": ["original", "diffusers"]},
        "telemetry": {"wandb_mode": "disabled"},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sdxl_vpred_ztsnr_trains_resumes_exports_and_samples(tmp_path, monkeypatch):
    cfg = make_sdxl_world(tmp_path)
    script = "launch/train_sdxl.sh"
    ref = launch(cfg, "run.name=ref", script=script)
    out = finish(ref, timeout=400)
    assert ref.returncode == 0, out[-3000:]
    ref_steps, _ = read_log(tmp_path / "runs" / "ref")
    assert sorted(ref_steps) == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["train/loss"]) for r in ref_steps.values())

    run_dir = tmp_path / "runs" / "kill"
    proc = launch(cfg, "run.name=kill", script=script)
    _wait_for_step(run_dir, 4, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = launch(cfg, "run.name=kill", script=script)
    out = finish(resumed, timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    assert any(e["event"] == "resumed" and e["step"] == 3 for e in events)
    for s in range(1, STEPS + 1):
        assert steps[s]["train/loss"] == ref_steps[s]["train/loss"], f"loss differs at step {s}"

    last = run_dir / "ckpt" / f"step_{STEPS:07d}"
    for sub in (last, last / "ema"):
        keys = set(load_file(sub / "sdxl.safetensors"))
        assert {"v_pred", "ztsnr"} <= keys, sub  # ComfyUI / Forge load it as v-pred with ZTSNR
        assert (sub / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    gen = get_family("sdxl").load_generator(last, torch.device("cpu"))  # EMA weights
    assert gen.sampler.cfg.spacing == "trailing" and gen.sampler.prediction == "v"
    # the floats behind each image (final latents, decoded pixels before the uint8 conversion, where a
    # NaN would turn into a plain black pixel), recorded as the generator hands them to to_pil
    decoded: list[tuple[torch.Tensor, torch.Tensor]] = []
    decode = gen.codec.decode

    def recording_decode(latents: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode(latents)
        decoded.extend(zip(latents, out))
        return out

    monkeypatch.setattr(gen.codec, "decode", recording_decode)
    images = gen.generate(["red girl hat", "blue sky tree"], [(64, 64), (64, 64)], [0, 1])
    assert len(decoded) == len(images) == 2
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, (im, (z, pixels)) in enumerate(zip(images, decoded)):
        assert z.shape == (4, 8, 8) and pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
        assert torch.isfinite(z).all() and torch.isfinite(pixels).all(), f"image {i}: non-finite latents or pixels"
        assert np.array_equal(np.asarray(im), np.asarray(to_pil(pixels)))  # these floats made this image
        im.save(samples / f"{i}.png")
    stats = folder_stats(samples, progress=False)
    assert failure_flags(stats) == {}, stats  # no white collapse, no oversaturation
    assert stats["white_frac"] < 0.05
