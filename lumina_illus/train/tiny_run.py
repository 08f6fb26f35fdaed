"""A self-contained tiny training run for tests and benchmarks: 48 random 64x64 images (or `size`) in 6 shards,
a random tiny Gemma-2, a random tiny Flux VAE and a run config (2 ranks, ZeRO-2, fp32) over them.

    cfg_path = make_tiny_run(Path("/tmp/tiny"))   # cached: a second call returns the same file
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

WORDS = ["red", "blue", "girl", "boy", "hat", "sky", "tree", "cat"]


def write_random_shards(folder: Path, images: int = 48, size: int = 64) -> str:
    """`images` random size x size images, one WORDS tag each, 8 per shard in `folder`; returns the shard glob."""
    from lumina_illus.data.shards import write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(images):
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        # one tag per image (caption randomness, e.g. dropout, is per sample and resumes exactly)
        samples.append({"__key__": f"s{i:03d}", "png": img, "json": {"tags": {"general": [WORDS[i % len(WORDS)]]}}})
    write_shards(samples, folder, samples_per_shard=8, prefix="t")
    return str(Path(folder) / "t-*.tar")


def make_tiny_run(folder: Path, images: int = 48, size: int = 64) -> Path:
    """Write shards, components and `run.yaml` into `folder` (once); returns the config path."""
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    folder = Path(folder)
    cfg_path = folder / "run.yaml"
    if cfg_path.is_file():
        return cfg_path
    shards = write_random_shards(folder / "shards", images, size)
    make_tiny_gemma2(folder / "gemma", vocab_corpus=WORDS)
    make_tiny_flux_vae(folder / "vae", channels=(8, 8, 8, 8))
    cfg = {
        "family": "lumina2",
        "run": {"name": "run", "out_dir": str(folder / "runs"), "seed": 3},
        "model": {
            "arch": {"preset": "tiny"},
            "text_encoder": {"path": str(folder / "gemma"), "max_tokens": 32, "dtype": "fp32"},
            "vae": {"path": str(folder / "vae")},
            "sampler": {"steps": 2},
        },
        "data": {
            "shards": [shards], "num_workers": 0, "batching": "bucket",
            "min_area": size * size, "max_area": size * size, "bucket_step": 64, "token_budget": (size // 8) ** 2,
            # a real shuffle buffer and caption dropout: with the world unchanged the loader resumes
            # the very batches (order, captions) of the uninterrupted run (lumina_illus/data/__init__.py)
            "shuffle_buffer": 8,
            "caption": {"caption_dropout": 0.1, "nl_prob": 0.0},
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"global_batch": 4, "micro_batch": 1, "grad_accum": 2, "max_steps": 6, "zero_stage": 2,
                  "precision": "fp32"},
        "ema": {"decay": 0.9},
        "checkpoint": {"every_steps": 3, "every_minutes": 0, "keep_last": 1, "export_layouts": ["original"]},
        "telemetry": {"wandb_mode": "disabled"},
    }
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path
