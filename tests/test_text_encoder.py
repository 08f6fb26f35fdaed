"""Gemma-2 text encoder on a tiny random Gemma-2: same features and mask as diffusers'
Lumina2Pipeline.encode_prompt, Lumina's system prompt template, frozen vs trainable."""

import pytest
import torch

from lumina_illus.config import ConfigError, from_dict
from lumina_illus.models.text_encoder import (
    LUMINA_SYSTEM_PROMPT,
    GemmaTextEncoder,
    TextEncoderConfig,
    build_prompt,
)
from lumina_illus.models.tiny import make_tiny_gemma2

torch.set_num_threads(1)

CAPTIONS = ["1girl, red hair, smile", "a cat sitting on a chair , blue eyes", ""]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_tiny_gemma2(tmp_path_factory.mktemp("gemma"), vocab_corpus=CAPTIONS)


def test_system_prompt_is_lumina_default():
    from diffusers import Lumina2Pipeline

    pipe = Lumina2Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=None, tokenizer=None)
    assert LUMINA_SYSTEM_PROMPT == pipe.system_prompt
    assert TextEncoderConfig().system_prompt == pipe.system_prompt
    assert TextEncoderConfig().max_tokens == 256 and TextEncoderConfig().layer == -2


def test_features_match_diffusers_lumina2_encode_prompt(gemma_dir):
    from diffusers import Lumina2Pipeline
    from transformers import AutoModel, AutoTokenizer

    enc = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir)))
    feats, mask = enc.encode(CAPTIONS[:2])
    pipe = Lumina2Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=AutoModel.from_pretrained(gemma_dir),
        tokenizer=AutoTokenizer.from_pretrained(gemma_dir),
    )
    # diffusers adds the template to prompts but not to negative prompts; we template both (an empty
    # caption after dropout keeps the system prompt), so diffusers gets the templated negative here
    negative = build_prompt("", LUMINA_SYSTEM_PROMPT)
    ref, ref_mask, neg, neg_mask = pipe.encode_prompt(
        CAPTIONS[:2], negative_prompt=[negative] * 2, device=torch.device("cpu")
    )
    n = feats.shape[1]
    assert ref.shape[1] == 256 and n < 256  # diffusers pads to 256; we pad to the longest caption
    assert torch.equal(mask, ref_mask[:, :n].bool()) and not ref_mask[:, n:].any()
    valid = mask[..., None]
    assert torch.allclose(feats * valid, ref[:, :n] * valid, atol=1e-5)
    nf, nm = enc.encode([""])
    assert nm.sum() == neg_mask[0].sum() > 2
    assert torch.allclose(nf[0][nm[0]], neg[0][neg_mask[0].bool()], atol=1e-5)


def test_layer_selection_and_truncation(gemma_dir):
    last = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir), layer=-1))
    pen = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir)))
    assert not torch.allclose(last.encode(CAPTIONS[:1])[0], pen.encode(CAPTIONS[:1])[0])
    short = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir), max_tokens=8))
    f, m = short.encode(CAPTIONS)
    assert f.shape == (3, 8, 32) and m.all()
    raw = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir), system_prompt=""))
    assert raw.encode([""])[1].sum() == 1  # only <bos>: no template without a system prompt


def test_frozen_by_default_and_trainable_on_request(gemma_dir):
    frozen = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir)))
    frozen.train()
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.encode(CAPTIONS)[0].requires_grad

    trainable = GemmaTextEncoder(TextEncoderConfig(path=str(gemma_dir), trainable=True, lr=1e-5))
    feats, mask = trainable.encode(CAPTIONS)
    (feats * mask[..., None]).pow(2).mean().backward()
    named = dict(trainable.model.named_parameters())
    learning = {n for n, p in named.items() if p.requires_grad}
    assert learning and all(named[n].grad is not None for n in learning)  # every trainable one learns
    # hidden_states[-2] of 2 layers is layer 0's output: layer 1 and the final norm stay frozen
    assert not any(n.startswith(("layers.1.", "norm.")) for n in learning)
    assert any(n.startswith("layers.0.") for n in learning)
    with torch.no_grad():
        assert not trainable.encode(CAPTIONS)[0].requires_grad


def test_bad_config_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.path: .* has no config.json"):
        GemmaTextEncoder(TextEncoderConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="no Gemma-2 path configured"):
        GemmaTextEncoder(TextEncoderConfig())
    with pytest.raises(ConfigError, match="run.yaml.*model.text_encoder.max_tokens"):
        from_dict(TextEncoderConfig, {"max_tokens": "many"}, where="run.yaml", prefix="model.text_encoder.")
