"""SDXL checkpoint layouts: the community single file (A1111 / ComfyUI / Forge) and the diffusers folder.

    comps = read_single_file("illustrious.safetensors", unet_cfg, vae_cfg)   # -> SingleFile
    comps.state["unet"], comps.state["text_encoder"], ...; comps.v_pred, comps.ztsnr
    write_single_file("out.safetensors", state, unet_cfg, vae_cfg, v_pred=True, ztsnr=True, metadata={...})

Single-file key layout (the original Stability "sgm" names, which ComfyUI and Forge load):

    model.diffusion_model.*               UNet (input_blocks / middle_block / output_blocks)
    conditioner.embedders.0.transformer.* CLIP ViT-L, HF transformers names (text_model.*)
    conditioner.embedders.1.model.*       OpenCLIP ViT-bigG, OpenCLIP names (resblocks, fused in_proj)
    first_stage_model.*                   VAE (ldm names: down.i.block.j, mid.attn_1 as 1x1 convs)
    v_pred, ztsnr                         empty marker tensors: ComfyUI's SDXL.model_type() switches to
                                          v-prediction when "v_pred" is a key and enables zero-terminal-SNR
                                          sampling when "ztsnr" is a key as well; Forge reads the same keys.

The mapping to diffusers names is built from the UNet/VAE configs (levels, layers per block, which
levels have attention), following diffusers' scripts/convert_diffusers_to_original_sdxl.py, and is
checked to be a bijection over the model's keys, so reading what we wrote is exact.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
MARKER_V_PRED = "v_pred"
MARKER_ZTSNR = "ztsnr"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
# keys that community files carry and no diffusers module owns (OpenCLIP's contrastive temperature,
# position-id buffers); dropped on read
_IGNORED_SUFFIXES = ("logit_scale", "position_ids")


# ---------------------------------------------------------------------------------------------
# UNet: diffusers <-> sgm


def _resnet_unet(rest: str) -> str:
    for d, s in (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                 ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")):
        if rest.startswith(d):
            return s + rest[len(d):]
    raise KeyError(rest)


def _unet_prefixes(cfg: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, sgm prefix, is_resnet) for every block of an SDXL-structured UNet."""
    n = int(cfg["layers_per_block"])
    levels = len(cfg["block_out_channels"])
    attn_down = ["CrossAttn" in t for t in cfg["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in cfg["up_block_types"]]
    out: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    for i in range(levels):
        # input_blocks: 0 is conv_in, then per level n (resnet[, attention]) blocks and one downsampler
        for j in range(n):
            k = 1 + i * (n + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            if attn_down[i]:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
        if i < levels - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op.", False))
        # output_blocks: per level n+1 (resnet[, attention]) blocks, the upsampler rides on the last one
        for j in range(n + 1):
            k = i * (n + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            if attn_up[i]:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
        if i < levels - 1:
            k = i * (n + 1) + n
            out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{2 if attn_up[i] else 1}.conv.", False))
    return out


def unet_key_map(cfg: dict[str, Any], diffusers_keys: list[str]) -> dict[str, str]:
    """diffusers UNet key -> sgm key (without the model.diffusion_model. prefix)."""
    prefixes = sorted(_unet_prefixes(cfg), key=lambda p: -len(p[0]))  # longest match first
    out = {}
    for key in diffusers_keys:
        for d, s, is_res in prefixes:
            if key.startswith(d):
                rest = key[len(d):]
                out[key] = s + (_resnet_unet(rest) if is_res else rest)  # transformer names are shared
                break
        else:
            raise KeyError(f"UNet key {key!r} has no single-file name (not an SDXL-structured UNet?)")
    return out


# ---------------------------------------------------------------------------------------------
# VAE: diffusers <-> ldm

_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def vae_key_map(cfg: dict[str, Any], diffusers_keys: list[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> ldm key (without the first_stage_model. prefix)."""
    levels = len(cfg["block_out_channels"])
    prefixes: list[tuple[str, str]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(levels):
        prefixes.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        # the ldm decoder numbers its levels from the bottom up
        prefixes.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    prefixes.sort(key=lambda p: -len(p[0]))
    out = {}
    for key in diffusers_keys:
        new = key
        for d, s in prefixes:
            if key.startswith(d):
                new = s + key[len(d):]
                break
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            head, rest = new.split(".mid.attn_1.")
            for d, s in _VAE_ATTN:
                if rest.startswith(d):
                    rest = s + rest[len(d):]
            new = f"{head}.mid.attn_1.{rest}"
        out[key] = new
    return out


def _is_vae_attn_weight(ldm_key: str) -> bool:
    """ldm VAE attention projections are 1x1 convs (C, C, 1, 1); diffusers uses Linear (C, C)."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


# ---------------------------------------------------------------------------------------------
# OpenCLIP bigG <-> transformers CLIPTextModelWithProjection


def clip_g_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP text-tower names."""
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            # OpenCLIP's nn.MultiheadAttention keeps q, k, v in one fused (3D, D) projection
            out[f"{oc}attn.in_proj_{p}"] = torch.cat([sd[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"], dim=0)
            out[f"{oc}attn.out_proj.{p}"] = sd[f"{hf}self_attn.out_proj.{p}"]
            out[f"{oc}ln_1.{p}"] = sd[f"{hf}layer_norm1.{p}"]
            out[f"{oc}ln_2.{p}"] = sd[f"{hf}layer_norm2.{p}"]
            out[f"{oc}mlp.c_fc.{p}"] = sd[f"{hf}mlp.fc1.{p}"]
            out[f"{oc}mlp.c_proj.{p}"] = sd[f"{hf}mlp.fc2.{p}"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()  # OpenCLIP: x @ P, P is (D, proj)
    return out


def openclip_to_clip_g(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower names -> transformers CLIPTextModelWithProjection state dict."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("transformer.resblocks."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            hf = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                p = rest.rsplit("_", 1)[1]
                for x, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{hf}self_attn.{x}_proj.{p}"] = part.contiguous()
                continue
            table = {"attn.out_proj.": "self_attn.out_proj.", "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.",
                     "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
            for o, h in table.items():
                if rest.startswith(o):
                    out[hf + h + rest[len(o):]] = v
                    break
            else:
                raise KeyError(f"{where}: unknown OpenCLIP key {CLIP_G_PREFIX}{k}")
        elif k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        else:
            raise KeyError(f"{where}: unknown OpenCLIP key {CLIP_G_PREFIX}{k}")
    return out


# ---------------------------------------------------------------------------------------------
# whole single file


@functools.cache
def _clip_l_keeps_text_model() -> bool:
    """Whether this transformers version names CLIPTextModel weights "text_model.*" (4.x) or drops the
    prefix (5.x); the single file always spells it out."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    return next(iter(model.state_dict())).startswith("text_model.")


def _meta_keys(cls: Any, cfg: dict[str, Any]) -> list[str]:
    """State-dict keys of a diffusers model built from `cfg` on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = cls.from_config(cfg)
    return list(model.state_dict().keys())


def to_single_file(
    state: dict[str, dict[str, torch.Tensor]], unet_cfg: dict[str, Any], vae_cfg: dict[str, Any],
    v_pred: bool = False, ztsnr: bool = False,
) -> dict[str, torch.Tensor]:
    """{"unet", "text_encoder", "text_encoder_2", "vae"} diffusers/transformers state dicts -> one
    community state dict (with marker keys)."""
    missing = [c for c in COMPONENTS if c not in state]
    if missing:
        raise KeyError(f"to_single_file: missing components {missing}")
    out: dict[str, torch.Tensor] = {}
    for k, s in unet_key_map(unet_cfg, list(state["unet"])).items():
        out[UNET_PREFIX + s] = state["unet"][k]
    for k, v in state["text_encoder"].items():
        if not k.endswith(_IGNORED_SUFFIXES):
            out[CLIP_L_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    for k, v in clip_g_to_openclip(state["text_encoder_2"]).items():
        out[CLIP_G_PREFIX + k] = v
    for k, s in vae_key_map(vae_cfg, list(state["vae"])).items():
        v = state["vae"][k]
        out[VAE_PREFIX + s] = v[:, :, None, None] if _is_vae_attn_weight(s) and v.ndim == 2 else v
    if v_pred:
        out[MARKER_V_PRED] = torch.tensor([])
        if ztsnr:
            out[MARKER_ZTSNR] = torch.tensor([])
    elif ztsnr:
        raise ValueError("to_single_file: the ztsnr marker is only read together with v_pred (ComfyUI/Forge)")
    return {k: v.contiguous() for k, v in out.items()}


@dataclass
class SingleFile:
    state: dict[str, dict[str, torch.Tensor]]  # component -> diffusers/transformers state dict
    v_pred: bool  # "v_pred" marker present
    ztsnr: bool  # "ztsnr" marker present
    metadata: dict[str, str]  # safetensors header metadata


def from_single_file(
    sd: dict[str, torch.Tensor], unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], where: str = "<state dict>"
) -> SingleFile:
    """Community state dict -> per-component diffusers/transformers state dicts. Unknown keys raise
    a KeyError naming `where` and the key, so a non-SDXL file never loads half-way."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_inv = {s: d for d, s in unet_key_map(unet_cfg, _meta_keys(UNet2DConditionModel, unet_cfg)).items()}
    vae_inv = {s: d for d, s in vae_key_map(vae_cfg, _meta_keys(AutoencoderKL, vae_cfg)).items()}
    state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    clip_g: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in (MARKER_V_PRED, MARKER_ZTSNR) or k.endswith(_IGNORED_SUFFIXES):
            continue
        if k.startswith(UNET_PREFIX):
            name = k[len(UNET_PREFIX):]
            if name not in unet_inv:
                raise KeyError(f"{where}: key {k!r} does not belong to the configured SDXL UNet")
            state["unet"][unet_inv[name]] = v
        elif k.startswith(CLIP_L_PREFIX):
            name = k[len(CLIP_L_PREFIX):]
            state["text_encoder"][name if _clip_l_keeps_text_model() else name.removeprefix("text_model.")] = v
        elif k.startswith(CLIP_G_PREFIX):
            clip_g[k[len(CLIP_G_PREFIX):]] = v
        elif k.startswith(VAE_PREFIX):
            name = k[len(VAE_PREFIX):]
            if name not in vae_inv:
                raise KeyError(f"{where}: key {k!r} does not belong to the configured SDXL VAE")
            state["vae"][vae_inv[name]] = v[:, :, 0, 0] if _is_vae_attn_weight(name) and v.ndim == 4 else v
        else:
            raise KeyError(f"{where}: key {k!r} is not part of an SDXL single-file checkpoint")
    state["text_encoder_2"] = openclip_to_clip_g(clip_g, where)
    empty = [c for c in COMPONENTS if not state[c]]
    if empty:
        raise KeyError(f"{where}: no weights for {empty} (expected SDXL single-file prefixes)")
    return SingleFile(state, MARKER_V_PRED in sd, MARKER_ZTSNR in sd, {})


def write_single_file(
    path: str | Path, state: dict[str, dict[str, torch.Tensor]], unet_cfg: dict[str, Any], vae_cfg: dict[str, Any],
    v_pred: bool, ztsnr: bool, metadata: dict[str, str] | None = None,
) -> Path:
    """Save one community single-file checkpoint (safetensors, written to a temp name then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(to_single_file(state, unet_cfg, vae_cfg, v_pred, ztsnr), str(tmp), metadata=metadata or {})
    tmp.replace(path)
    return path


def read_single_file(path: str | Path, unet_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> SingleFile:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: single-file checkpoint not found")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    out = from_single_file(load_file(str(path)), unet_cfg, vae_cfg, where=str(path))
    out.metadata = meta
    return out


def is_sdxl_single_file(path: str | Path) -> bool:
    """True for a safetensors file holding an SDXL UNet (ADM label_emb) and the OpenCLIP bigG tower."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    return f"{UNET_PREFIX}label_emb.0.0.weight" in keys and f"{CLIP_G_PREFIX}ln_final.weight" in keys


# ---------------------------------------------------------------------------------------------
# diffusers folder


def is_sdxl_diffusers_folder(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    return json.loads(index.read_text()).get("_class_name", "").startswith("StableDiffusionXL")
