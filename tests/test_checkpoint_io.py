"""Checkpoint layouts: bit-exact round trips between every pair, diffusers loads our folder,
config inference, clear key errors, metadata in headers, the converter CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lumina_illus.families import METADATA_KEY, read_metadata
from lumina_illus.models.checkpoint_io import (
    COMFY_FILE,
    COMFY_PREFIX,
    LAYOUTS,
    ORIGINAL_FILE,
    CheckpointError,
    detect_layout,
    export_layouts,
    load_checkpoint,
)
from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> NextDiT:
    torch.manual_seed(0)
    m = NextDiT(nextdit_tiny(ffn_dim_multiplier=1.3))  # non-default FFN size exercises config inference
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()  # every tensor distinct and non-trivial (norm_final too)
    return m


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("src,dst", list(itertools.product(LAYOUTS, LAYOUTS)))
def test_round_trip_every_pair_is_bit_exact(model: NextDiT, tmp_path: Path, src: str, dst: str) -> None:
    m = NextDiT(model.config)
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    m.save_pretrained(tmp_path / "a", layout=src)
    a = NextDiT.from_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "b", layout=dst)
    b = NextDiT.from_pretrained(tmp_path / "b")
    expected = m.state_dict()
    if "diffusers" in (src, dst):  # diffusers has no norm_final: it comes back as ones
        expected["norm_final.weight"] = torch.ones_like(expected["norm_final.weight"])
    assert_same_state(b.state_dict(), expected)
    assert b.config == m.config
    assert not b.norm_final.weight.requires_grad
    assert all(p.requires_grad for n, p in b.named_parameters() if n != "norm_final.weight")


def test_diffusers_folder_loads_in_diffusers_with_same_output(model: NextDiT, tmp_path: Path) -> None:
    small = NextDiT(model.config)
    with torch.no_grad():  # the fixture's N(0, 1) weights overflow activations; scale them down
        for p_small, (name, p) in zip(small.parameters(), model.named_parameters()):
            p_small.copy_(p if "norm" in name else p * 0.1)
    small.save_pretrained(tmp_path, layout="diffusers")
    ref = Lumina2Transformer2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 16, 4, 6)
    feats, mask = torch.randn(2, 3, 32), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        ours = small(x, t, feats, mask)
        assert ours.abs().mean() > 1e-2
        torch.testing.assert_close(ours, ref(x, t, feats, mask).sample, rtol=1e-5, atol=1e-5)


def test_config_inferred_from_shapes_without_header(model: NextDiT, tmp_path: Path) -> None:
    for layout, name in (("original", ORIGINAL_FILE), ("comfy", COMFY_FILE)):
        model.save_pretrained(tmp_path, layout=layout)
        bare = tmp_path / f"bare_{name}"
        save_file(load_file(tmp_path / name), bare)  # same tensors, no header metadata
        state, cfg = load_checkpoint(bare)
        # the FFN rounding rule is not recoverable from shapes, only the resulting width
        assert cfg.ffn_hidden == model.config.ffn_hidden == 512
        same_rule = {"multiple_of": model.config.multiple_of, "ffn_dim_multiplier": model.config.ffn_dim_multiplier}
        assert replace(cfg, **same_rule) == model.config
        assert_same_state(state, model.state_dict())


def test_pth_read_with_weights_only(model: NextDiT, tmp_path: Path) -> None:
    path = tmp_path / "consolidated.00-of-01.pth"
    torch.save(model.state_dict(), path)
    loaded = NextDiT.from_pretrained(tmp_path)
    assert_same_state(loaded.state_dict(), model.state_dict())
    torch.save({"model": model.state_dict(), "args": object()}, path)  # a pickle with objects is refused
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys_are_listed(model: NextDiT, tmp_path: Path) -> None:
    state = {COMFY_PREFIX + k: v for k, v in model.state_dict().items()}
    del state[COMFY_PREFIX + "layers.1.feed_forward.w3.weight"]
    state[COMFY_PREFIX + "layers.1.extra.weight"] = torch.zeros(3)
    state["first_stage_model.decoder.conv.weight"] = torch.zeros(2)  # other models in an all-in-one file: ignored
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "comfy" in msg
    assert "missing keys (1): ['layers.1.feed_forward.w3.weight']" in msg
    assert "unexpected keys (1): ['layers.1.extra.weight']" in msg


def test_diffusers_missing_projection_is_named(model: NextDiT, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path, layout="diffusers")
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["layers.0.attn.to_k.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.to_k\.weight"):
        load_checkpoint(tmp_path)


def test_detect_layout() -> None:
    assert detect_layout(["layers.0.attention.qkv.weight", "cap_embedder.0.weight"]) == "original"
    assert detect_layout(["model.diffusion_model.cap_embedder.0.weight"]) == "comfy"
    assert detect_layout(["time_caption_embed.caption_embedder.0.weight"]) == "diffusers"
    with pytest.raises(CheckpointError, match="not a NextDiT"):
        detect_layout(["conv_in.weight"])


def test_export_layouts_names_dtype_and_metadata(model: NextDiT, tmp_path: Path) -> None:
    meta = {"family": "lumina2", "step": 7, "samples_seen": 896, "config": {"model": {"arch": model.config.to_dict()}}}
    state = {k: v for k, v in model.state_dict().items() if k != "norm_final.weight"}  # trainable params only
    paths = export_layouts(state, model.config, tmp_path, metadata=meta)
    names = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert names == sorted(["diffusers/config.json", "diffusers/diffusion_pytorch_model.safetensors", COMFY_FILE, ORIGINAL_FILE])
    for p in paths:
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                assert json.loads(f.metadata()[METADATA_KEY]) == meta
                assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert read_metadata(tmp_path / ORIGINAL_FILE)["samples_seen"] == 896
    loaded = NextDiT.from_pretrained(tmp_path)  # a folder with every layout picks the original file
    torch.testing.assert_close(loaded.norm_final.weight, torch.ones(model.config.dim, dtype=torch.bfloat16))


def test_convert_cli(model: NextDiT, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "lumina_illus.models.convert"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--layout" in help_text and "python -m lumina_illus.models.convert" in help_text
    model.save_pretrained(tmp_path / "src", layout="comfy", metadata={"family": "lumina2", "step": 3})
    subprocess.run([*run, str(tmp_path / "src" / COMFY_FILE), str(tmp_path / "out"), "--layout", "diffusers", "--dtype", "fp16"], check=True, capture_output=True)
    loaded = NextDiT.from_pretrained(tmp_path / "out")
    assert loaded.x_embedder.weight.dtype == torch.float16
    torch.testing.assert_close(loaded.x_embedder.weight, model.x_embedder.weight.half())
    assert read_metadata(tmp_path / "out")["step"] == 3
