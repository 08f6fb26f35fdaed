"""Real-width smoke run: the 2.6B model's real configuration wired end to end on CPU, no downloads.

    pytest -m slow tests/test_real_width_smoke.py -s        # prints wall time and peak memory

What runs, built from the published configs with random weights (lumina_illus.models.tiny):
- NextDiT at Lumina-Image-2.0's width (preset `2b`: dim 2304, 24 query / 8 KV heads, head dim 96, SwiGLU
  9216, both 2-layer refiners) with 2 main layers instead of 26: 514M parameters;
- Gemma-2-2B's architecture (GEMMA2_2B: hidden 2304, 8 / 4 heads, head dim 256, FFN 9216, the 256000-token
  embedding) with 3 layers instead of 26 (823M parameters). Why: the frozen encoder runs in fp32 on CPU
  (text_encoder.py), so 26 layers are 10.4 GB in the training process, on top of ~11 GB of DeepSpeed
  state for the NextDiT: over the 20 GB this test may use. 3 layers keep every kind of layer in the
  features Lumina reads (hidden_states[-2] = after a sliding-window and a global-attention layer);
- the full Flux VAE (FLUX_VAE, 84M parameters), encoding the 256x256 images every step.

It trains as configs/lu2b_768.yaml trains: bf16 (fp32 master weights, Adam states and accumulation),
full activation checkpointing, ZeRO-2, token-budget packing (2 images of 256x256 in one micro-batch),
the Gemma system prompt, 2 optimizer steps under DeepSpeed on 1 rank (`bash launch/train_lu.sh`); then
the bf16 export is reloaded through the family's generator loader and one Euler step with CFG is
sampled and decoded. Changed from lu2b_768 besides the sizes: EMA off (its fp32 copy is 2 GB more and
is width-independent, tested on the tiny world) and one export layout (all three: test_train_bf16).

Measured on the 2-core CI machine (2026-11-30): see BENCHMARKS.md "Real-width smoke run".
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import finish, launch, read_log  # noqa: E402  the trainer's run harness

from lumina_illus.models.nextdit import NextDiT, nextdit_2b  # noqa: E402

GIB = 2**30
SIZE = 256  # training and sampling resolution (pixels)
N_LAYERS = 2  # main NextDiT layers (the published model has 26)
GEMMA_LAYERS = 3  # Gemma-2-2B layers (26 published), see the module docstring


def make_world(folder: Path) -> Path:
    """Shards of 256x256 images, the random real-width Gemma-2 and Flux VAE, and run.yaml; returns its path."""
    from lumina_illus.models.tiny import make_random_flux_vae, make_random_gemma2
    from lumina_illus.train.tiny_run import WORDS, write_random_shards

    shards = write_random_shards(folder / "shards", images=8, size=SIZE)
    make_random_gemma2(folder / "gemma", vocab_corpus=WORDS, num_hidden_layers=GEMMA_LAYERS)
    make_random_flux_vae(folder / "vae")
    cfg = {
        "family": "lumina2",
        "run": {"name": "smoke", "out_dir": str(folder / "runs"), "seed": 0},
        "model": {
            "arch": {"preset": "2b", "n_layers": N_LAYERS, "attention": "auto"},
            "text_encoder": {"path": str(folder / "gemma"), "max_tokens": 256, "dtype": "bf16"},
            "vae": {"path": str(folder / "vae")},
            "objective": {"timestep": "logit_normal", "shift": "resolution"},
            "sampler": {"steps": 30, "shift": 6.0, "guidance": 4.0},
        },
        "data": {"shards": [shards], "num_workers": 0, "shuffle_buffer": 4, "batching": "tokens",
                 "token_budget": 2 * (SIZE // 16) ** 2, "min_area": SIZE * SIZE, "max_area": SIZE * SIZE,
                 "bucket_step": 64, "caption": {"caption_dropout": 0.1}},
        "optim": {"lr": 2.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 2.0},
        "train": {"global_batch": 2, "micro_batch": 2, "grad_accum": 1, "max_steps": 2, "zero_stage": 2,
                  "precision": "bf16", "activation_checkpointing": True},
        "ema": {"enabled": False},
        "checkpoint": {"every_steps": 0, "every_minutes": 0, "export_layouts": ["original"],
                       "export_dtype": "bf16"},
        "telemetry": {"wandb_mode": "disabled"},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_real_width_train_export_reload_sample(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    cfg = make_world(tmp_path)
    t_build = time.perf_counter() - t0

    proc = launch(cfg, ranks=1, launcher=["bash"])
    out = finish(proc, timeout=480)
    assert proc.returncode == 0, out[-4000:]
    t_train = time.perf_counter() - t0 - t_build
    train_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest finished child
    # the backend that ran and every block checkpointed: 2 context + 2 noise refiner + 2 main layers
    assert "attention backend sdpa (asked: auto), activation checkpointing 6/6 blocks, compile False" in out

    run_dir = tmp_path / "runs" / "smoke"
    steps, events = read_log(run_dir)
    assert sorted(steps) == [1, 2], steps
    for s in (1, 2):
        loss, gn = steps[s]["train/loss"], steps[s]["train/grad_norm"]
        assert math.isfinite(loss) and 0.1 < loss < 10.0 and math.isfinite(gn) and gn > 0.0, steps[s]
    # both 256x256 images of a step in ONE packed micro-batch of the token budget
    assert steps[2]["train/samples_seen"] == 4 and steps[2]["data/image_tokens_per_micro_batch"] == 512
    prec = next(e for e in events if e["event"] == "precision")
    assert prec["module"] == ["bfloat16"] and prec["master"] == ["float32"], prec
    assert prec["optimizer_states"] == ["float32"] and prec["grad_accum"] == "float32", prec

    # the export holds exactly the 2B-width model's tensors (norm_final included), in bf16
    ckpt = run_dir / "ckpt" / "step_0000002"
    assert (ckpt / "ds").is_dir() and (run_dir / "ckpt" / "latest").read_text() == ckpt.name  # resume state
    exported = load_file(str(ckpt / "lumina2.safetensors"))
    with torch.device("meta"):
        expected = NextDiT(nextdit_2b(n_layers=N_LAYERS)).state_dict()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert exported["layers.1.attention.qkv.weight"].shape == (3840, 2304)  # (24 + 2 * 8) heads x 96
    assert exported["layers.0.feed_forward.w1.weight"].shape == (9216, 2304)
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    n_params = sum(v.numel() for v in exported.values())

    # reload through the family's loader (metadata names Gemma and the VAE), one sampling step with CFG
    from lumina_illus.families import get_family

    gen = get_family("lumina2").load_generator(ckpt, device="cpu")
    dit_cfg = gen.model.config
    assert (dit_cfg.dim, dit_cfg.n_layers, dit_cfg.n_heads, dit_cfg.n_kv_heads, dit_cfg.head_dim,
            dit_cfg.ffn_hidden, dit_cfg.cap_feat_dim) == (2304, N_LAYERS, 24, 8, 96, 9216, 2304)
    assert gen.text_encoder.dim == 2304 and gen.text_encoder.model.config.num_hidden_layers == GEMMA_LAYERS
    live = gen.model.state_dict()
    assert all(torch.equal(live[k], exported[k].float()) for k in exported)  # the trained bf16 weights
    traj = gen.trajectory("red, 1girl", (SIZE, SIZE), seed=0, steps=1, guidance=4.0)
    latents = traj[-1]["x"]
    assert latents.shape == (16, SIZE // 8, SIZE // 8) and torch.isfinite(latents).all()
    # the step moved the noise (the trained final layer is no longer zero)
    assert not torch.equal(latents, traj[0]["x"])
    image = gen.decode(latents)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    t_total = time.perf_counter() - t0
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nreal-width smoke run: {n_params / 1e6:.1f}M NextDiT parameters; components built in "
          f"{t_build:.1f}s, training (2 steps + export) {t_train:.1f}s, total {t_total:.1f}s; "
          f"peak RSS: training process {train_rss / GIB:.2f} GiB, test process {self_rss / GIB:.2f} GiB")
    assert t_total < 600 and train_rss < 20 * GIB and self_rss < 20 * GIB
    # ~9.6 GB written (resume state 6.2 GB, Gemma 1.6 GB, export 1 GB): pytest keeps 3 runs' folders
    shutil.rmtree(run_dir / "ckpt" / "step_0000002" / "ds")
    shutil.rmtree(tmp_path / "gemma")
