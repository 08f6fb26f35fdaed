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
    load_nextdit,
    save_nextdit,
)
from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

torch.set_num_threads(1)
FILE_LAYOUTS = [x for x in LAYOUTS if x != "official"]  # the official layout takes official architectures only


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


@pytest.mark.parametrize("src,dst", list(itertools.product(FILE_LAYOUTS, FILE_LAYOUTS)))
def test_round_trip_every_pair_is_bit_exact(model: NextDiT, tmp_path: Path, src: str, dst: str) -> None:
    m = NextDiT(model.config)
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    save_nextdit(m, tmp_path / "a", layout=src)
    a = load_nextdit(tmp_path / "a")
    save_nextdit(a, tmp_path / "b", layout=dst)
    b = load_nextdit(tmp_path / "b")
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
    save_nextdit(small, tmp_path, layout="diffusers")
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
        save_nextdit(model, tmp_path, layout=layout)
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
    loaded = load_nextdit(tmp_path)
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
    save_nextdit(model, tmp_path, layout="diffusers")
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
    loaded = load_nextdit(tmp_path)  # a folder with every layout picks the original file
    torch.testing.assert_close(loaded.norm_final.weight, torch.ones(model.config.dim, dtype=torch.bfloat16))


def test_convert_cli(model: NextDiT, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "lumina_illus.models.convert"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--layout" in help_text and "python -m lumina_illus.models.convert" in help_text
    save_nextdit(model, tmp_path / "src", layout="comfy", metadata={"family": "lumina2", "step": 3})
    subprocess.run([*run, str(tmp_path / "src" / COMFY_FILE), str(tmp_path / "out"), "--layout", "diffusers", "--dtype", "fp16"], check=True, capture_output=True)
    loaded = load_nextdit(tmp_path / "out")
    assert loaded.x_embedder.weight.dtype == torch.float16
    torch.testing.assert_close(loaded.x_embedder.weight, model.x_embedder.weight.half())
    assert read_metadata(tmp_path / "out")["step"] == 3


# ---- the official Lumina-Image-2.0 checkpoint folder (consolidated.00-of-01.pth + model_args.pth)
# Its sample.py does: train_args = torch.load(ckpt/model_args.pth); model = models.__dict__[train_args.model](
# in_channels=16, qk_norm=True, cap_feat_dim=...); model.load_state_dict(torch.load(ckpt/consolidated
# {'_ema' if ema}.00-of-01.pth), strict=True). The factories' values below are transcribed from the official
# models/model.py (Alpha-VLLM/Lumina-Image-2.0), independently of checkpoint_io.OFFICIAL_FACTORIES.
OFFICIAL_MODEL_PY = {
    "NextDiT_2B_GQA_patch2_Adaln_Refiner": dict(patch_size=2, dim=2304, n_layers=26, n_heads=24, n_kv_heads=8,
                                                axes_dims=(32, 32, 32), axes_lens=(300, 512, 512)),
    "NextDiT_3B_GQA_patch2_Adaln_Refiner": dict(patch_size=2, dim=2592, n_layers=30, n_heads=24, n_kv_heads=8,
                                                axes_dims=(36, 36, 36), axes_lens=(300, 512, 512)),
    "NextDiT_4B_GQA_patch2_Adaln_Refiner": dict(patch_size=2, dim=2880, n_layers=32, n_heads=24, n_kv_heads=8,
                                                axes_dims=(40, 40, 40), axes_lens=(300, 512, 512)),
    "NextDiT_7B_GQA_patch2_Adaln_Refiner": dict(patch_size=2, dim=3840, n_layers=32, n_heads=32, n_kv_heads=8,
                                                axes_dims=(40, 40, 40), axes_lens=(300, 512, 512)),
}


def test_official_factories_are_the_official_architectures() -> None:
    from lumina_illus.models.checkpoint_io import official_config, official_factory
    from lumina_illus.models.nextdit import nextdit_2b

    assert official_factory(nextdit_2b()) == "NextDiT_2B_GQA_patch2_Adaln_Refiner"  # the public 2.6B model
    for name, kw in OFFICIAL_MODEL_PY.items():
        cfg = official_config(name, cap_feat_dim=2304)
        assert {k: getattr(cfg, k) for k in kw} == kw and cfg.in_channels == 16 and cfg.n_refiner_layers == 2
        assert official_factory(cfg) == name
    with pytest.raises(CheckpointError, match="official architectures"):
        official_factory(nextdit_tiny())


@pytest.fixture
def tiny_factory(monkeypatch, model: NextDiT) -> str:
    """Register the tiny model's architecture as an official factory (the real ones are GBs of weights)."""
    from lumina_illus.models import checkpoint_io

    c = model.config
    name = "NextDiT_tiny_test"
    monkeypatch.setitem(checkpoint_io.OFFICIAL_FACTORIES, name, dict(
        dim=c.dim, n_layers=c.n_layers, n_refiner_layers=c.n_refiner_layers, n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads, multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier,
        axes_dims=c.axes_dims))
    return name


def test_official_folder_both_ways(tmp_path: Path, model: NextDiT, tiny_factory: str) -> None:
    import argparse

    # a folder as the official training writes it: two weight files (raw, EMA) and the pickled training args
    src = tmp_path / "official_release"
    src.mkdir()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v * 0.5 for k, v in state.items()}
    torch.save(state, src / "consolidated.00-of-01.pth")
    torch.save(ema, src / "consolidated_ema.00-of-01.pth")
    torch.save(argparse.Namespace(model=tiny_factory, qk_norm=True, lr=1e-4, global_bsz=512, model_parallel_size=1),
               src / "model_args.pth")
    raw, cfg = load_checkpoint(src)
    assert_same_state(raw, state) and cfg.dim == model.config.dim
    assert_same_state(load_checkpoint(src, ema=True)[0], ema)
    assert_same_state(load_nextdit(src).state_dict(), state)
    # and written by us: the folder the official sample.py reads, loadable by its own rule
    paths = save_nextdit(model, tmp_path / "ours", layout="official", metadata={"family": "lumina2", "step": 7})
    assert sorted(p.name for p in paths) == ["consolidated.00-of-01.pth", "model_args.pth"]
    args = torch.load(tmp_path / "ours" / "model_args.pth", weights_only=False)  # as sample.py does
    assert args.model == tiny_factory and args.qk_norm is True
    official = NextDiT(nextdit_tiny(**checkpoint_factory_kwargs(args.model)))  # models.__dict__[args.model](...)
    official.load_state_dict(torch.load(tmp_path / "ours" / "consolidated.00-of-01.pth"), strict=True)
    x = [torch.randn(16, 8, 8)]
    cap, mask = torch.randn(1, 5, model.config.cap_feat_dim), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(official(x, torch.tensor([0.3]), cap, mask)[0], model(x, torch.tensor([0.3]), cap, mask)[0])
    assert_same_state(load_checkpoint(tmp_path / "ours")[0], state)


def checkpoint_factory_kwargs(name: str) -> dict:
    from lumina_illus.models import checkpoint_io

    return dict(checkpoint_io.OFFICIAL_FACTORIES[name])


def test_official_folder_bad_input(tmp_path: Path, model: NextDiT, tiny_factory: str) -> None:
    import argparse

    torch.save(model.state_dict(), tmp_path / "consolidated.00-of-01.pth")
    torch.save(argparse.Namespace(model="NextDiT_2B_GQA_patch2_Adaln_Refiner"), tmp_path / "model_args.pth")
    with pytest.raises(CheckpointError, match=r"model_args.pth: model 'NextDiT_2B_GQA_patch2_Adaln_Refiner' does not "
                                              r"match the weights in consolidated.00-of-01.pth.*'dim': \(2304, 96\)"):
        load_checkpoint(tmp_path)
    torch.save(argparse.Namespace(model=tiny_factory, where=Path("/somewhere")), tmp_path / "model_args.pth")
    with pytest.raises(CheckpointError, match="cannot read as an official model_args.pth"):
        load_checkpoint(tmp_path)  # a pickle that is not plain data is never unpickled
    (tmp_path / "consolidated.00-of-01.pth").unlink()
    with pytest.raises(CheckpointError, match="without consolidated.00-of-01.pth"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="official architectures"):
        save_nextdit(NextDiT(nextdit_tiny()), tmp_path / "x", layout="official")


def test_official_export_of_another_architecture_stops_at_start(world: Path) -> None:
    from lumina_illus.config import ConfigError, load_config
    from lumina_illus.families import get_family

    cfg = load_config(world, ["checkpoint.export_layouts=[original, official]"])
    with pytest.raises(ConfigError, match=r"run.yaml: checkpoint.export_layouts has 'official' but .*official architectures"):
        get_family("lumina2").build_training(cfg, torch.device("cpu"))


def test_sample_sizes_the_model_cannot_draw_stop_at_start(world: Path) -> None:
    from lumina_illus.config import ConfigError, load_config
    from lumina_illus.families import get_family

    cfg = load_config(world, ["sampling.sizes=[[64, 64], [100, 64]]"])
    with pytest.raises(ConfigError, match=r"run.yaml: sampling.sizes: 100x64: width and height must be positive multiples of 16"):
        get_family("lumina2").build_training(cfg, torch.device("cpu"))
