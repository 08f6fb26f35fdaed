"""Toy world: determinism by seed, long-tailed counts, tag categories, shards read by the project's
loader, characters.csv read by the eval, VAE latent normalisation, and a WD-format tagger that
recognises held-out renders."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from lumina_illus.toyworld.render import render
from lumina_illus.toyworld.spec import CATEGORY_CHARACTER, CHARACTERS, long_tail_counts
from lumina_illus.toyworld.world import WorldConfig, sample_world, write_world

SMALL = WorldConfig(seed=3, most=24, fewest=3, samples_per_shard=40)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_world_other_seed_differs():
    a, b, c = sample_world(SMALL), sample_world(SMALL), sample_world(WorldConfig(seed=4, most=24, fewest=3))
    assert [(s.key, s.scene, s.tags, s.caption) for s in a] == [(s.key, s.scene, s.tags, s.caption) for s in b]
    assert [_png(render(s.scene)) for s in a[:5]] == [_png(render(s.scene)) for s in b[:5]]
    assert [s.scene for s in a] != [s.scene for s in c]


def test_long_tail_counts_and_world_composition():
    counts = long_tail_counts(12, 2000, 20)
    assert counts[0] == 2000 and counts[-1] == 20
    assert all(x > y for x, y in zip(counts, counts[1:]))  # strictly long-tailed, most frequent first
    assert counts[0] / counts[-1] == 100
    world = sample_world(SMALL)
    per_char = Counter(s.scene.character.tag for s in world if s.scene.character is not None)
    assert [per_char[ch.tag] for ch in CHARACTERS] == SMALL.counts()
    n_chars = sum(SMALL.counts())
    assert len(world) - n_chars == round(n_chars * SMALL.scenery_fraction)
    # shuffled: the first shard is not just the most frequent character
    assert len({s.scene.character for s in world[: len(world) // 4]}) > 3
    with pytest.raises(ValueError, match="most >= fewest"):
        long_tail_counts(12, 5, 10)


def test_tags_by_category_match_the_scene():
    for s in sample_world(SMALL):
        assert set(s.tags) == {"character", "copyright", "general", "meta"}
        ch = s.scene.character
        if ch is None:
            assert s.tags["character"] == [] and "no_humans" in s.tags["general"]
            continue
        assert s.tags["character"] == [ch.tag] and s.tags["copyright"] == [ch.copyright]
        assert f"{ch.hair_color}_hair" in s.tags["general"] and ch.count_tag in s.tags["general"]
        assert s.scene.framing in s.tags["general"]
        assert ch.tag.replace("_", " ") in s.caption
    # every character is distinguishable by hair colour alone
    assert len({c.hair_color for c in CHARACTERS}) == len(CHARACTERS)
    assert len({c.tag for c in CHARACTERS}) == len(CHARACTERS)


def test_shards_read_by_the_data_pipeline_and_characters_by_the_eval(tmp_path):
    from lumina_illus.config import DataConfig
    from lumina_illus.data.captions import CaptionConfig, build_caption
    from lumina_illus.data.shards import expand_shards, iter_tar
    from lumina_illus.evaluation.characters import load_characters

    manifest = write_world(SMALL, tmp_path)
    world = sample_world(SMALL)
    urls = expand_shards([str(tmp_path / "shards" / "toy-*.tar")])
    assert len(urls) == len(manifest["shards"]) == -(-len(world) // SMALL.samples_per_shard)
    read = [ts for u in urls for ts in iter_tar(u)]
    assert not any(isinstance(ts, Exception) for ts in read)
    assert [ts.key for ts in read] == [s.key for s in world]
    cap_cfg = CaptionConfig(caption_dropout=0.0, nl_prob=0.0)
    for ts, s in zip(read, world):
        assert set(ts.files) == {"png", "txt", "json"}
        meta = json.loads(ts.files["json"])
        assert meta["tags"] == s.tags and (meta["width"], meta["height"]) == s.scene.size
        assert set(meta["control"]) == {"contrast", "brightness", "sharpness", "dynamic_colors", "colorfulness",
                                        "saturation"}  # fmt: skip
        assert ts.files["png"] == _png(render(s.scene))
        caption = build_caption(cap_cfg, ts.files["txt"].decode(), meta, random.Random(0))
        if s.scene.character is not None:  # the caption builder keeps character, copyright first
            assert caption.startswith(s.scene.character.prompt.split(", 1")[0])
    # the trainer's loader streams the shards into batches
    from lumina_illus.data.loader import build_loader

    cfg = DataConfig(shards=urls, num_workers=0, batching="bucket", min_area=64 * 64, max_area=128 * 128,
                     bucket_step=32, min_side=32, caption={"caption_dropout": 0.0})  # fmt: skip
    batch = next(iter(build_loader(cfg, micro_batch=4, rank=0, world_size=1, seed=0)))
    assert len(batch) == 4 and batch.images[0].shape[0] == 3 and all(c for c in batch.captions)

    chars = load_characters(tmp_path / "characters.csv")
    assert [(c.tag, c.train_samples) for c in chars] == [(ch.tag, n) for ch, n in zip(CHARACTERS, SMALL.counts())]
    assert chars[0].prompt == "hoshino aoi, star academy, 1girl"
    # the report's training image of each character: its first sample in the world, as stored in the shards
    for ch in CHARACTERS:
        first = next(s for s in world if s.scene.character == ch)
        assert (tmp_path / "examples" / f"{ch.tag}.png").read_bytes() == _png(render(first.scene)), ch.tag


@pytest.mark.parametrize("quant_conv", [True, False])
def test_latent_normalisation_keeps_reconstructions_and_gives_unit_latents(quant_conv):
    from diffusers import AutoencoderKL

    from lumina_illus.toyworld.vae_train import normalise_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv).eval()  # fmt: skip
    images = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(6)]
    first = vae.post_quant_conv if quant_conv else vae.decoder.conv_in  # first layer the latent meets

    def first_layer_out(x):  # (1, C', 16, 16): what the decoder computes from the encoded mean
        return first(vae.encode(x[None]).latent_dist.mean)

    with torch.no_grad():
        before = [first_layer_out(x) for x in images]
        scale, shift = 0.3611, 0.1159
        normalise_latents(vae, images, scale, shift)
        z = torch.cat([vae.encode(x[None]).latent_dist.mean.flatten(2) for x in images], 2)[0]  # (C, N)
        zn = (z - shift) * scale
        after = [first_layer_out(x) for x in images]
    torch.testing.assert_close(zn.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(zn.std(1), torch.ones(4), atol=1e-4, rtol=0)
    for b, a in zip(before, after):
        if quant_conv:  # the 1x1 post-quant conv absorbs the change exactly
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        else:  # the 3x3 conv_in: exact except where its zero padding meets the shift (one-pixel border)
            torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(a, b, atol=1e-4)


def test_tagger_is_wd_format_and_recognises_heldout_renders(tmp_path):
    from lumina_illus.evaluation.tagger import WDTagger
    from lumina_illus.toyworld.tagger import TaggerConfig, train_tagger

    torch.set_num_threads(2)
    # a small fast version (the full one reaches 1.0): chance is 1/12
    cfg = TaggerConfig(per_character=24, negatives=24, heldout_per_character=6, epochs=20, width=16, batch_size=32,
                       lr=6e-3)  # fmt: skip
    report = train_tagger(tmp_path, WorldConfig(seed=0), cfg)
    assert report["heldout_char_accuracy"] >= 0.75, report
    # read back through the eval's WD loader: NHWC input, one output per selected_tags row
    tagger = WDTagger(tmp_path)
    assert tagger.size == cfg.size
    assert [t.name for t in tagger.tags if t.category == CATEGORY_CHARACTER] == [c.tag for c in CHARACTERS]
    header = (tmp_path / "selected_tags.csv").read_text().splitlines()[0]
    assert header == "tag_id,name,category,count"
    # fresh renders of another world seed, non-square, through WD preprocessing (pad on white)
    world = [s for s in sample_world(WorldConfig(seed=99, most=4, fewest=4)) if s.scene.character][:24]
    probs = tagger.predict([render(s.scene) for s in world])  # (24, n_tags)
    cols = [tagger.index(c.tag) for c in CHARACTERS]
    pred = [CHARACTERS[i].tag for i in np.argmax(probs[:, cols], axis=1)]
    acc = np.mean([p == s.scene.character.tag for p, s in zip(pred, world)])
    assert acc >= 0.75, acc


def test_components_are_built_once_and_reused(tmp_path, capsys):
    from transformers import AutoTokenizer

    from lumina_illus.toyworld.components import MARKER, ComponentsConfig, build_toy_world
    from lumina_illus.toyworld.tagger import TaggerConfig
    from lumina_illus.toyworld.vae_train import VAETrainConfig

    torch.set_num_threads(2)
    tiny_vae = VAETrainConfig(images=8, steps=2, decoder_steps=1, batch_size=2, heldout=2)
    cfg = ComponentsConfig(vae_channels=(8, 8, 8, 8), vae=tiny_vae,
                           tagger=TaggerConfig(per_character=1, negatives=2, heldout_per_character=1, epochs=1))  # fmt: skip
    info = build_toy_world(tmp_path, SMALL, cfg)
    assert set(info["reports"]) == {"shards", "vae", "gemma", "tagger"}
    assert json.loads((tmp_path / "world.json").read_text())["world"]["seed"] == SMALL.seed
    for part in ("vae/config.json", "gemma/config.json", "tagger/model.onnx", "tagger/selected_tags.csv"):
        assert (tmp_path / "components" / part).is_file(), part
    # the tokenizer knows every caption word of the world: no <unk> in any character prompt
    tok = AutoTokenizer.from_pretrained(tmp_path / "components" / "gemma")
    for ch in CHARACTERS:
        assert tok.unk_token_id not in tok(ch.prompt + ", solo, upper body, simple background")["input_ids"]
    markers = {p: p.stat().st_mtime_ns for p in tmp_path.rglob(MARKER)}
    assert len(markers) == 4
    capsys.readouterr()
    build_toy_world(tmp_path, SMALL, cfg)  # same key: everything reused
    assert capsys.readouterr().out.count("cached") == 4
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob(MARKER)} == markers
    cfg.tagger.epochs = 2  # a changed part rebuilds, the rest stays
    build_toy_world(tmp_path, SMALL, cfg)
    assert capsys.readouterr().out.count("cached") == 3
    assert (tmp_path / "components" / "tagger" / MARKER).stat().st_mtime_ns != markers[tmp_path / "components" / "tagger" / MARKER]
