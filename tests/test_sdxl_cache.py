"""Cached latents and CLIP features for the SDXL family (issue 17): data/cache_latents.py --text-embeds
--caption-variants K on an SDXL config stores, per caption variant, the concatenated penultimate CLIP-L +
bigG states of the caption's own 77-token chunks and bigG's pooled output; the SDXL training path
rebuilds from them (padding a batch to its longest prompt with the empty chunk) exactly the UNet inputs
that the live VAE and CLIPs give the same images and captions. Trainable CLIPs with such a cache stop at
start naming the key and the config file."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lumina_illus.config import CaptionConfig, ConfigError, DataConfig, config_from_raw
from lumina_illus.data import build_loader, write_shards
from lumina_illus.data.batch import Batch
from lumina_illus.data.shards import iter_tar
from lumina_illus.data.stream import decode_sample
from lumina_illus.families import get_family
from lumina_illus.models.sdxl import CHUNK, chunk_counts, load_components

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import cache_latents  # noqa: E402
from test_caption_variants import _png, cached  # noqa: E402  (cached: folder -> {key: (json, tensors)})

torch.set_num_threads(1)
K, SEED, N, CHUNKS = 2, 5, 8, 3
L = CHUNK + 2  # 77 tokens per chunk
# tags of very different lengths (the tiny tokenizer spends about one token per letter), so that one
# batch mixes prompts of 1, 2 and 3 chunks and one runs past max_text_chunks
CAPTION = {"caption_dropout": 0.15, "tag_dropout": 0.2, "nl_prob": 0.3}


def _data(shards: str, latents: bool) -> dict:
    return {"shards": [shards], "cached_latents": latents, "min_area": 64 * 64, "max_area": 64 * 64,
            "bucket_step": 64, "batching": "bucket", "num_workers": 0, "shuffle_buffer": 1, "caption": CAPTION}


def _run_cfg(tiny: Path, data: dict, **optim) -> dict:
    return {"family": "sdxl", "run": {"seed": SEED},
            "model": {"pretrained": str(tiny), "max_text_chunks": CHUNKS,
                      "objective": {"prediction": "v", "zero_terminal_snr": True}},
            "data": data, "optim": {"lr": 1e-4, **optim}}


@pytest.fixture(scope="module")
def world(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images in 2 shards, captions of 1 to 4 chunks, and their caches: K=2 variants in fp32 and one
    variant in the default bf16."""
    root = tmp_path_factory.mktemp("sdxl_cache")
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"img{i:02d}", "png": _png(rng), "txt": "a girl " * (3 + 9 * i),
                "json": {"tags": {"character": [f"c{i % 3}"], "general": [f"tag number {j}" for j in range(4 * i)]}}}
               for i in range(N)]
    write_shards(samples, root / "in", N // 2)
    cfg = root / "sdxl.yaml"
    cfg.write_text(yaml.safe_dump(_run_cfg(tiny, _data(str(root / "in" / "shard-{000000..000001}.tar"), False))))
    common = ["--device", "cpu", "--threads", "1", "--text-embeds"]
    assert cache_latents.main([str(cfg), str(root / "k2"), *common, "--dtype", "fp32", "--caption-variants", str(K)]) == 0
    assert cache_latents.main([str(cfg), str(root / "k1"), *common]) == 0
    return root


def _loader(out: Path):
    return build_loader(DataConfig(**_data(str(out / "shard-{000000..000001}.tar"), True)), micro_batch=4, rank=0,
                        world_size=1, seed=SEED)


def test_cache_stores_own_chunks_and_pooled_compactly(world: Path, tiny: Path) -> None:
    tok = load_components(tiny, unet=False).tokenizer
    for name, variants, dtype in (("k2", K, torch.float32), ("k1", 1, torch.bfloat16)):
        chunks = set()
        for key, (meta, tensors) in cached(world / name).items():
            caps = meta["cached_captions"] if variants > 1 else [meta["cached_caption"]]
            names = [f"text_embeds_{k}" for k in range(K)] if variants > 1 else ["text_embeds"]
            for cap, emb in zip(caps, names):
                c = chunk_counts(tok, [cap], CHUNKS)[1][0]
                chunks.add(c)
                pooled = tensors[emb.replace("embeds", "pooled")]
                # only the caption's own chunks (no batch padding), 32 + 48 wide; bigG's pooled output (48) before its projection
                assert tensors[emb].shape == (c * L, 80) and pooled.shape == (48,), (key, cap)
                assert tensors[emb].dtype == pooled.dtype == dtype
            assert tensors["latent"].shape == (4, 8, 8) and tensors["latent"].dtype == dtype
        assert chunks == {1, 2, 3}, f"{name}: captions should need 1, 2 and 3 chunks, got {chunks}"
    settings = json.loads((world / "k2" / "manifest.json").read_text())["settings"]
    assert settings["text_encoder"]["max_text_chunks"] == CHUNKS and settings["vae"]["scaling_factor"] == 0.13025


def test_cached_unet_inputs_equal_the_live_vae_and_clips_bit_for_bit(world: Path, tiny: Path) -> None:
    """For every batch of the K=2 fp32 cache: prepare() on the cached latents + CLIP features and prepare()
    on the same images and captions through the live VAE and CLIPs give identical tensors (noisy latents,
    targets, timesteps, micro-conditioning, prompt embeds, pooled). CPU fp32, batches mixing 1-3 chunks."""
    cfg = config_from_raw(_run_cfg(tiny, _data(str(world / "k2" / "shard-*.tar"), True)), "cached.yaml")
    parts = get_family("sdxl").build_training(cfg, torch.device("cpu"))
    images = {}  # cache key "00000i_imgNN" -> the image as the uncached loader decodes it (no crop at 64x64)
    for i, url in enumerate(sorted((world / "in").glob("shard-*.tar"))):
        for ts in iter_tar(str(url)):
            d = decode_sample(ts, DataConfig(**_data(str(url), False)), CaptionConfig(), random.Random(0), False)
            images[f"{i:06d}_{ts.key}"] = d["pixels"]
    it, mixed = iter(_loader(world / "k2")), 0
    for _ in range(4):
        b = next(it)
        assert b.text_embeds is not None and b.text_pooled is not None and b.latents is not None
        live = Batch(keys=b.keys, captions=b.captions, images=[images[k.split("/")[1]] for k in b.keys],
                     original_sizes=b.original_sizes, crops=b.crops, target_sizes=b.target_sizes)
        got = parts.prepare(b, torch.Generator().manual_seed(1))
        want = parts.prepare(live, torch.Generator().manual_seed(1))
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{k} differs in batch {b.keys}"
        mixed += len({e.shape[0] for e in b.text_embeds}) > 1
    assert mixed >= 2  # the empty-chunk padding was exercised
    parts.module(**got).loss.backward()  # and trains


def test_trainable_clips_with_a_text_cache_stop_at_start(world: Path, tiny: Path) -> None:
    raw = _run_cfg(tiny, _data(str(world / "k1" / "shard-*.tar"), True), text_encoder_lr=1e-5)
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.text_encoder_lr is set .*k1/manifest\.json"):
        get_family("sdxl").build_training(config_from_raw(raw, "bad.yaml"), torch.device("cpu"))
    # shards without a manifest still refuse, at the first batch that brings cached features
    raw["data"] = _data(str(world / "in" / "shard-*.tar"), False)
    parts = get_family("sdxl").build_training(config_from_raw(raw, "bad.yaml"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cached CLIP features, but optim\.text_encoder_lr in bad\.yaml"):
        parts.prepare(next(iter(_loader(world / "k1"))), torch.Generator())


def test_a_cache_of_more_chunks_than_the_run_allows_is_refused(world: Path, tiny: Path) -> None:
    raw = _run_cfg(tiny, _data(str(world / "k1" / "shard-*.tar"), True))
    raw["model"]["max_text_chunks"] = 1
    parts = get_family("sdxl").build_training(config_from_raw(raw, "one.yaml"), torch.device("cpu"))
    it = iter(_loader(world / "k1"))
    with pytest.raises(ValueError, match=r"model\.max_text_chunks \(1\)"):
        for _ in range(2):
            parts.prepare(next(it), torch.Generator())
