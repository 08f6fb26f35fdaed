"""SDXL single-file layout: exact round trip, agreement with diffusers' own converter, v_pred/ztsnr markers."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lumina_illus.models import sdxl_checkpoint as ck
from lumina_illus.models.sdxl import load_components

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def comps(tiny):
    return load_components(tiny)


def _state(comps):
    return {n: getattr(comps, n).state_dict() for n in ck.COMPONENTS}


def _cfgs(comps):
    return dict(comps.unet.config), dict(comps.vae.config)


def test_single_file_keys_follow_the_community_layout(comps, tmp_path):
    path = ck.write_single_file(tmp_path / "m.safetensors", _state(comps), *_cfgs(comps), v_pred=False, ztsnr=False)
    keys = set(load_file(path))
    for k in (  # names every SDXL loader (A1111, ComfyUI, Forge, kohya) expects
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # after resnet + attention
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
    ):
        assert k in keys, k
    assert "v_pred" not in keys and "ztsnr" not in keys
    # ldm VAE attention is a 1x1 conv, OpenCLIP projection is (width, proj)
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
        assert f.get_slice("conditioner.embedders.1.model.text_projection").get_shape() == [48, 32]


def test_round_trip_is_exact_and_markers_are_read(comps, tmp_path):
    state = _state(comps)
    path = ck.write_single_file(tmp_path / "v.safetensors", state, *_cfgs(comps), v_pred=True, ztsnr=True,
                                metadata={"k": "v"})
    sf = ck.read_single_file(path, *_cfgs(comps))
    assert sf.v_pred and sf.ztsnr and sf.metadata["k"] == "v"
    for name in ck.COMPONENTS:
        assert set(sf.state[name]) == set(state[name]), name
        for k, v in state[name].items():
            assert torch.equal(sf.state[name][k], v), (name, k)
    # and written again, byte-for-byte the same tensors under the same keys
    again = ck.to_single_file(sf.state, *_cfgs(comps), v_pred=True, ztsnr=True)
    orig = load_file(path)
    assert set(again) == set(orig)
    assert all(torch.equal(again[k], orig[k]) for k in orig)


def _comfy_model_type(state_dict: dict) -> str:
    """ComfyUI supported_models.SDXL.model_type(): the rule community UIs use for SDXL single files."""
    if "v_pred" in state_dict:
        return "V_PREDICTION" + ("+zsnr" if "ztsnr" in state_dict else "")
    return "EPS"


@pytest.mark.parametrize("v_pred,ztsnr,expect", [(False, False, "EPS"), (True, False, "V_PREDICTION"),
                                                  (True, True, "V_PREDICTION+zsnr")])
def test_markers_are_what_comfyui_reads(comps, tmp_path, v_pred, ztsnr, expect):
    path = ck.write_single_file(tmp_path / "m.safetensors", _state(comps), *_cfgs(comps), v_pred=v_pred, ztsnr=ztsnr)
    assert _comfy_model_type(load_file(path)) == expect


def test_ztsnr_marker_without_v_pred_is_refused(comps):
    with pytest.raises(ValueError, match="ztsnr"):
        ck.to_single_file(_state(comps), *_cfgs(comps), v_pred=False, ztsnr=True)


def test_diffusers_reads_our_single_file_identically(tiny, comps, tmp_path):
    """diffusers' own converter (single_file_utils) must produce exactly our weights from our file."""
    from diffusers import StableDiffusionXLPipeline

    state = _state(comps)
    path = ck.write_single_file(tmp_path / "m.safetensors", state, *_cfgs(comps), v_pred=True, ztsnr=True)
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny), local_files_only=True)
    for name in ck.COMPONENTS:
        theirs = getattr(pipe, name).state_dict()
        for k, v in state[name].items():
            assert torch.equal(theirs[k], v), (name, k)


def test_load_components_from_single_file_matches_folder(tiny, comps, tmp_path):
    path = ck.write_single_file(tmp_path / "m.safetensors", _state(comps), *_cfgs(comps), v_pred=True, ztsnr=False)
    again = load_components(path, components=tiny)
    assert again.v_pred and not again.ztsnr
    for name in ck.COMPONENTS:
        a, b = getattr(comps, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ValueError, match="model.components"):
        load_components(path)


def test_foreign_keys_raise_with_file_and_key(comps, tmp_path):
    sd = ck.to_single_file(_state(comps), *_cfgs(comps))
    sd["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KeyError, match=r"bad\.safetensors.*input_blocks\.99"):
        ck.read_single_file(path, *_cfgs(comps))


def test_detection(tiny, comps, tmp_path):
    path = ck.write_single_file(tmp_path / "m.safetensors", _state(comps), *_cfgs(comps), v_pred=False, ztsnr=False)
    assert ck.is_sdxl_single_file(path)
    assert ck.is_sdxl_diffusers_folder(tiny)
    other = tmp_path / "other.safetensors"
    save_file({"layers.0.attention.qkv.weight": torch.zeros(2, 2)}, str(other))
    assert not ck.is_sdxl_single_file(other)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Lumina2Pipeline"}))
    assert not ck.is_sdxl_diffusers_folder(tmp_path)
