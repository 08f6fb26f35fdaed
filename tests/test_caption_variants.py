"""Cached text features with K caption variants (issue 17): data/cache_latents.py --text-embeds
--caption-variants K stores K augmented captions per sample and their features (only the real tokens, in
the storage dtype); the latent-mode loader draws variant k from the sample's own random stream, so the
choice is a function of (seed, epoch, shard, sample) and a resumed loader picks exactly the same ones.
The old one-caption format ("cached_caption", "text_embeds") still loads."""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors

from lumina_illus.config import DataConfig
from lumina_illus.data import build_loader, write_shards
from lumina_illus.data.cursor import merge_states

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import cache_latents  # noqa: E402

K, SEED, N = 4, 7, 8


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CAPTION = {"caption_dropout": 0.1, "tag_dropout": 0.3, "nl_prob": 0.3}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 image shards of 4 samples (tags and a sentence each), a tiny Flux VAE, a tiny Gemma-2, and the
    cache made with K variants in bf16 (and, for the old format, one variant)."""
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    root = tmp_path_factory.mktemp("variants")
    rng = np.random.default_rng(0)
    general = [f"tag{j}" for j in range(8)]
    samples = [{"__key__": f"img{i:02d}", "png": _png(rng), "txt": f"a picture of c{i % 3}",
                "json": {"tags": {"character": [f"c{i % 3}"], "general": general}}} for i in range(N)]
    write_shards(samples, root / "in", N // 2)
    make_tiny_flux_vae(root / "vae")
    make_tiny_gemma2(root / "gemma", vocab_corpus=["a picture of c0 c1 c2 " + " ".join(general)])
    data = {"shards": [str(root / "in" / "shard-{000000..000001}.tar")], "min_area": 64 * 64, "max_area": 64 * 64,
            "area_step": 32, "bucket_step": 32, "patch_tokens_per_side": 16, "num_workers": 0, "caption": CAPTION}
    model = {"arch": {"preset": "tiny"}, "vae": {"path": str(root / "vae")},
             "text_encoder": {"path": str(root / "gemma"), "dtype": "fp32"}}
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"family": "lumina2", "run": {"seed": SEED}, "model": model, "data": data}))
    common = [str(cfg), "--device", "cpu", "--threads", "1", "--text-embeds"]
    assert cache_latents.main([*common[:1], str(root / "k4"), *common[1:], "--caption-variants", str(K)]) == 0
    assert cache_latents.main([*common[:1], str(root / "k1"), *common[1:]]) == 0
    return root


def cached(out: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """'shard-i.tar/key' -> (json, tensors) of a cache folder."""
    got: dict[str, list] = {}
    for p in sorted(out.glob("shard-*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                got.setdefault(f"{p.name}/{key}", [None, None])
                body = tar.extractfile(m).read()
                if ext == "json":
                    got[f"{p.name}/{key}"][0] = json.loads(body)
                else:
                    got[f"{p.name}/{key}"][1] = load_safetensors(body)
    return {k: (m, t) for k, (m, t) in got.items()}


def test_variants_differ_and_equal_the_live_encoder_in_bf16(world: Path) -> None:
    from lumina_illus.models.text_encoder import GemmaTextEncoder, TextEncoderConfig

    encoder = GemmaTextEncoder(TextEncoderConfig(path=str(world / "gemma"), dtype="fp32"), device=torch.device("cpu"))
    samples = cached(world / "k4")
    assert len(samples) == N
    distinct, kinds = 0, set()
    for key, (meta, tensors) in samples.items():
        caps = meta["cached_captions"]
        assert len(caps) == K and "cached_caption" not in meta and "tags" not in meta, key
        assert sorted(tensors) == ["latent", *[f"text_embeds_{k}" for k in range(K)]]
        distinct += len(set(caps)) >= 3  # each variant has its own random stream
        kinds.update("sentence" if c.startswith("a picture") else "tags" if c else "dropped" for c in caps)
        for k, cap in enumerate(caps):
            feats, mask = encoder.encode([cap])  # (1, L, D), (1, L): one caption alone, as training would
            stored = tensors[f"text_embeds_{k}"]
            assert stored.dtype == torch.bfloat16
            assert stored.shape == (int(mask.sum()), feats.shape[-1]), f"{key} variant {k}: padding stored?"
            torch.testing.assert_close(stored.float(), feats[0][mask[0]], rtol=1e-2, atol=1e-2)
    assert distinct == N and kinds == {"sentence", "tags", "dropped"}  # tag order and dropout, sentence vs tags
    # variant 0 is the caption the one-variant cache froze
    old = cached(world / "k1")
    for key, (meta, tensors) in old.items():
        assert samples[key][0]["cached_captions"][0] == meta["cached_caption"]
        assert torch.equal(samples[key][1]["text_embeds_0"], tensors["text_embeds"])


def _loader(out: Path, **kw):
    cfg = DataConfig(shards=[str(out / "shard-{000000..000001}.tar")], cached_latents=True, min_area=64 * 64,
                     max_area=64 * 64, area_step=32, bucket_step=32, patch_tokens_per_side=16, token_budget=64,
                     shuffle_buffer=3, num_workers=0, caption=CAPTION)
    return build_loader(cfg, micro_batch=2, rank=0, world_size=1, seed=SEED, **kw)


def _take(ld, it, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        b = next(it)
        out += [(src, k, c, e) for src, k, c, e in zip(ld.last_sources, b.keys, b.captions, b.text_embeds)]
    return out


def test_loader_picks_the_variant_of_seed_epoch_sample_and_resumes_exactly(world: Path) -> None:
    samples = cached(world / "k4")
    ld = _loader(world / "k4")
    ref = _take(ld, iter(ld), 16)  # 4 batches of 2 per epoch: 4 epochs
    picks: dict[str, set[int]] = {}
    for (epoch, shard, ordinal), key, cap, embeds in ref:
        meta, tensors = samples[key]
        k = random.Random(f"{SEED}/{epoch}/{shard}/{ordinal}").randrange(K)
        assert cap == meta["cached_captions"][k], (key, epoch)
        assert torch.equal(embeds, tensors[f"text_embeds_{k}"].float())
        picks.setdefault(key, set()).add(k)
    assert {e for (e, _, _), *_ in ref} >= {0, 1, 2}
    assert sum(len(v) > 1 for v in picks.values()) >= N // 2  # the choice changes with the epoch

    for cut in (3, 7):
        lds = _loader(world / "k4")
        it = iter(lds)
        head = _take(lds, it, cut)
        state = json.loads(json.dumps(merge_states([lds.state_dict()])))  # as the trainer saves it
        resumed = _loader(world / "k4")
        resumed.load_state_dict(state)
        tail = _take(resumed, iter(resumed), 16 - cut)
        for got, want in zip(head + tail, ref, strict=True):
            assert got[:3] == want[:3] and torch.equal(got[3], want[3]), f"diverged after resuming at batch {cut}"


def test_one_variant_cache_still_loads(world: Path) -> None:
    samples = cached(world / "k1")
    ld = _loader(world / "k1")
    for (_, key, cap, embeds) in _take(ld, iter(ld), 6):
        meta, tensors = samples[key]
        assert cap == meta["cached_caption"] and torch.equal(embeds, tensors["text_embeds"].float())


@pytest.mark.parametrize("config,var", [("toy_lu", "CACHE"), ("toy_sdxl", "CACHE_SDXL")])
def test_quickstart_caches_what_the_toy_runs_train_on(config: str, var: str) -> None:
    """configs/toy_lu.yaml and configs/toy_sdxl.yaml (--sdxl) train on the caches launch/quickstart.sh makes
    (latents and the text features of K caption variants), with their text encoders frozen."""
    from lumina_illus.config import load_config

    script = (ROOT / "launch" / "quickstart.sh").read_text()
    cache = script.split(f"\n{var}=", 1)[1].split("\n", 1)[0]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    assert cfg.data.cached_latents and cfg.data.shards == [f"{cache}/shard-*.tar"]
    assert cfg.optim.text_encoder_lr is None and not getattr(getattr(cfg.model, "text_encoder", None), "trainable", False)
    assert f'cache_once configs/{config}.yaml "${var}"\n' in script
    command = script.split("cache_once() {", 1)[1].split("\n}", 1)[0]  # the one cache command both stages run
    assert 'data/cache_latents.py "$1" "$2"' in command and "--text-embeds" in command and "--caption-variants 4" in command
    assert 'if [ -f "$2/manifest.json" ]' in command  # made once


def test_trainable_gemma_on_a_text_cache_encodes_the_cached_captions(world: Path, capsys) -> None:
    """Deliberate (lumina2.py docstring): a trainable Gemma on a cache of frozen Gemma features says so at
    start and encodes the batch's captions, the cached variants a frozen run draws; the features go unused."""
    from lumina_illus.config import config_from_raw
    from lumina_illus.families import get_family

    raw = yaml.safe_load((world / "cfg.yaml").read_text())
    raw["data"].update(shards=[str(world / "k4" / "shard-*.tar")], cached_latents=True)
    raw["model"]["text_encoder"].update(trainable=True, lr=1e-5)
    parts = get_family("lumina2").build_training(config_from_raw(raw, "te.yaml"), torch.device("cpu"))
    assert f"trainable on a cache of frozen Gemma features ({world / 'k4' / 'manifest.json'})" in capsys.readouterr().out
    b = next(iter(_loader(world / "k4")))
    assert b.text_embeds is not None
    inputs = parts.prepare(b, torch.Generator().manual_seed(0))
    ids, mask = parts.module.text_encoder.tokenize(b.captions)
    assert "cap_feats" not in inputs and torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
