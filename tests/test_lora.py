"""LoRA for both families (lumina_illus/models/lora.py): only adapters train, bad settings stop at start,
and the exported files mean what ComfyUI and peft take them to mean.

ComfyUI is not installed here; the parts of its loader our files go through are transcribed below from
comfyanonymous/ComfyUI comfy/lora.py (commit 41444b5236c613ee5ff7d09aa620f94b702f30eb; the Lumina2
branch of model_lora_keys_unet in later versions only adds diffusers-named keys, the generic loop is
unchanged): model_lora_keys_unet's first loop (the names for every `diffusion_model.*` weight of the
loaded model), load_lora's regular lora_up/lora_down/alpha branch, and calculate_weight's "lora" patch.
ComfyUI's model state dict holds a single file's keys without its leading "model." (ComfyUI single
file: `model.diffusion_model.<name>`), which for NextDiT is the original layout and for SDXL the sgm
layout of our single-file export (checkpoint_io.to_layout / sdxl_checkpoint.unet_key_map).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lumina_illus.config import ConfigError, config_from_raw, load_config, to_dict
from lumina_illus.families import get_family
from lumina_illus.models.lora import KOHYA_FILE, PEFT_DIR
from lumina_illus.models.nextdit import NextDiTConfig

torch.set_num_threads(1)
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# ComfyUI, transcribed (comfy/lora.py @ 41444b52)


def comfy_model_lora_keys_unet(sdk: list[str]) -> dict[str, str]:
    """model_lora_keys_unet, its loop over the model's own state-dict keys."""
    key_map = {}
    for k in sdk:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map[f"lora_unet_{key_lora}"] = k
                key_map[f"lora_prior_unet_{key_lora}"] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map[f"{k}"] = k
    return key_map


def comfy_load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, str]) -> tuple[dict, list[str]]:
    """load_lora, regular lora branch: ({model key: ("lora", (up, down, alpha, mid))}, keys not loaded;
    ComfyUI logs 'lora key not loaded' for each of those and ignores them)."""
    patch_dict, loaded_keys = {}, set()
    for x in to_load:
        alpha_name = f"{x}.alpha"
        alpha = None
        if alpha_name in lora.keys():
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        regular_lora = f"{x}.lora_up.weight"
        if regular_lora in lora.keys():
            A_name, B_name = regular_lora, f"{x}.lora_down.weight"
            patch_dict[to_load[x]] = ("lora", (lora[A_name], lora[B_name], alpha, None))
            loaded_keys.add(A_name)
            loaded_keys.add(B_name)
    return patch_dict, [x for x in lora.keys() if x not in loaded_keys]


def comfy_calculate_weight(weight: torch.Tensor, v: tuple) -> torch.Tensor:
    """calculate_weight, patch_type "lora", strength 1, no mid/dora/reshape."""
    mat1, mat2 = v[0].float(), v[1].float()
    alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    return weight + (alpha * lora_diff).type(weight.dtype)


def comfy_merge(file: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our kohya file applied to a ComfyUI model state dict `base` ("diffusion_model.*"); asserts every
    key of the file is loaded."""
    lora = load_file(file)
    patches, not_loaded = comfy_load_lora(lora, comfy_model_lora_keys_unet(list(base)))
    assert not_loaded == [], f"ComfyUI would ignore {not_loaded[:5]}"
    assert len(patches) * 3 == len(lora)
    out = dict(base)
    for k, (kind, v) in patches.items():
        assert kind == "lora"
        out[k] = comfy_calculate_weight(base[k].clone(), v)
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def _randomize(module: torch.nn.Module) -> None:
    """Trained-looking weights: LoRA up (lora_B) and the zero-initialised output layers start at zero,
    which would make every comparison below vacuous."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _only_adapters_train(parts) -> None:
    trainable = {id(p) for p in parts.module.parameters() if p.requires_grad}
    grouped = [p for g in parts.param_groups for p in g["params"]]
    names = {id(p): n for n, p in parts.module.named_parameters()}
    assert grouped and {id(p) for p in grouped} == trainable
    assert all(".lora_A." in names[id(p)] or ".lora_B." in names[id(p)] for p in grouped)
    frozen = [n for n, p in parts.module.named_parameters() if not p.requires_grad]
    assert any(".base_layer." in n for n in frozen)


def nextdit_inputs(c: NextDiTConfig) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed packed NextDiT input (two images of different sizes, one padded caption): x, t, cap, mask."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(c.in_channels, 8, 8, generator=g), torch.randn(c.in_channels, 4, 8, generator=g)]
    t = torch.tensor([0.3, 0.8])
    cap = torch.randn(2, 5, c.cap_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return x, t, cap, mask


def _peft_load(base: torch.nn.Module, folder) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).eval()


# ---------------------------------------------------------------------------------------------
# Lumina-2


def test_lumina_lora_export_equals_live_adapters_in_comfyui_and_peft(world, tmp_path):
    from lumina_illus.models.checkpoint_io import to_layout
    from lumina_illus.models.nextdit import NextDiT

    cfg = load_config(world, ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
    parts = get_family("lumina2").build_training(cfg, CPU)
    _only_adapters_train(parts)
    _randomize(parts.module)
    dit = parts.module.dit.eval()
    files = parts.export(parts.module.state_dict(), tmp_path, {"family": "lumina2"})
    assert sorted(p.name for p in files) == ["adapter_config.json", "adapter_model.safetensors", KOHYA_FILE]
    assert not (tmp_path / "lumina2.safetensors").exists()  # no full weights unless lora.export_merged

    base_sd = {k.replace(".base_layer.", "."): v for k, v in dit.state_dict().items() if ".lora_" not in k}
    comfy = {k.removeprefix("model."): v for k, v in to_layout(base_sd, dit.config, "comfy").items()}
    merged = comfy_merge(str(tmp_path / KOHYA_FILE), comfy)
    plain = NextDiT(dit.config).eval()
    plain.load_state_dict({k.removeprefix("diffusion_model."): v for k, v in merged.items()})

    x, t, cap, mask = nextdit_inputs(dit.config)
    with torch.no_grad():
        live = dit(x, t, cap, mask)
        via_comfy = plain(x, t, cap, mask)
        base = NextDiT(dit.config).eval()
        base.load_state_dict(base_sd)
        assert (base(x, t, cap, mask)[0] - live[0]).abs().max() > 1e-3  # the adapters do something
        via_peft = _peft_load(base, tmp_path / PEFT_DIR)(x, t, cap, mask)
    for a, b, p in zip(live, via_comfy, via_peft):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(p, a, atol=2e-5, rtol=1e-4)


def test_lora_settings_that_cannot_work_stop_at_start(world):
    fam = get_family("lumina2")
    cfg = load_config(world, ["lora.enabled=true", "lora.targets=['*.attention.qkv', '*.to_q']"])
    with pytest.raises(ConfigError, match=r"run\.yaml: lora\.targets: '\*\.to_q' matches no Linear layer"):
        fam.build_training(cfg, CPU)
    cfg = load_config(world, ["lora.enabled=true", "lora.rank=100000"])
    with pytest.raises(ConfigError, match=r"run\.yaml: lora\.rank = 100000 is larger than layer '.+' \(\d+ -> \d+\)"):
        fam.build_training(cfg, CPU)
    with pytest.raises(ConfigError, match=r"run\.yaml: .*'rank' must be >= 1"):
        load_config(world, ["lora.rank=0"])


# ---------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_lora_export_equals_live_adapters_in_comfyui_peft_and_merged(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from lumina_illus.models import sdxl_checkpoint as ckpt_io

    raw = {"family": "sdxl",
           "model": {"pretrained": str(tiny), "objective": {"prediction": "v", "timestep_sampling": "uniform"}},
           "lora": {"enabled": True, "rank": 4, "alpha": 2.0, "timestep_sampling": "logit_normal",
                    "export_merged": True},
           "checkpoint": {"export_layouts": ["original"]}}
    cfg = config_from_raw(raw, "sdxl_lora.yaml")
    parts = get_family("sdxl").build_training(cfg, CPU)
    assert cfg.model.objective.timestep_sampling == "logit_normal"  # the LoRA override, in the run config
    _only_adapters_train(parts)
    _randomize(parts.module)
    unet = parts.module.unet.eval()
    parts.export(parts.module.state_dict(), tmp_path, {"family": "sdxl"})

    base_sd = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    to_sgm = ckpt_io.unet_key_map(dict(unet.config), list(base_sd))
    comfy = {"diffusion_model." + to_sgm[k]: v for k, v in base_sd.items()}
    merged = comfy_merge(str(tmp_path / KOHYA_FILE), comfy)
    from_sgm = {"diffusion_model." + s: d for d, s in to_sgm.items()}
    plain = UNet2DConditionModel.from_config(unet.config).eval()
    merged_diffusers = {from_sgm[k]: v for k, v in merged.items() if not torch.equal(v, comfy[k])}  # adapted
    plain.load_state_dict({from_sgm[k]: v for k, v in merged.items()})
    # lora.export_merged: the single file holds the same merged UNet
    single = load_file(str(tmp_path / "sdxl.safetensors"))
    for k, v in merged.items():
        torch.testing.assert_close(single["model." + k], v, atol=1e-6, rtol=0)

    c = unet.config
    g = torch.Generator().manual_seed(0)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    args = (torch.randn(2, c.in_channels, 8, 8, generator=g), torch.tensor([10, 900]))
    kw = {"encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
    with torch.no_grad():
        live = unet(*args, **kw).sample
        via_comfy = plain(*args, **kw).sample
        base = UNet2DConditionModel.from_config(c).eval()
        base.load_state_dict(base_sd)
        assert (base(*args, **kw).sample - live).abs().max() > 1e-3
        via_peft = _peft_load(base, tmp_path / PEFT_DIR)(*args, **kw).sample
    torch.testing.assert_close(via_comfy, live, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(via_peft, live, atol=2e-5, rtol=1e-4)

    # a LoRA-only checkpoint folder loads for sampling/eval: its base with the adapters merged in
    (tmp_path / "sdxl.safetensors").unlink()
    (tmp_path / "meta.json").write_text(json.dumps({"family": "sdxl", "config": to_dict(cfg)}))
    gen = get_family("sdxl").load_generator(tmp_path, CPU)
    pretrained = UNet2DConditionModel.from_pretrained(tiny / "unet").state_dict()  # before _randomize
    for k, v in gen.unet.state_dict().items():
        delta = merged_diffusers[k] - base_sd[k] if k in merged_diffusers else 0.0
        torch.testing.assert_close(v, pretrained[k] + delta, atol=1e-6, rtol=0)
