"""LoRA through peft, shared by both families: inject, read back from a training state dict, export.

    lcfg = apply_lora(dit, cfg.lora, DEFAULT_TARGETS, where=cfg.source)   # base frozen, adapters trainable
    files = export_lora(state_dict, out_dir, metadata, cfg.lora, lcfg, prefix="dit.",
                        kohya_names=family_naming, write_full=...)

Adapters are peft `lora.Linear` layers injected into the network in place (`inject_adapter_in_model`),
so a wrapped Linear `X` holds `X.base_layer.weight` (frozen) and `X.lora_A.default.weight` (down,
(r, in)) / `X.lora_B.default.weight` (up, (out, r)); its output is base(x) + (alpha / r) * up(down(x)).
Only Linear layers take adapters. Exports:

- "comfy": one kohya-style file `lora.safetensors`, keys `<kohya name>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (sd-scripts' naming: `lora_unet_` + the module's name in the community
  single-file layout with dots as underscores); ComfyUI maps these names in comfy/lora.py
  (model_lora_keys_unet) and adds (alpha / rank) * up @ down to the weight (calculate_weight).
- "peft": `lora_peft/adapter_model.safetensors` + `adapter_config.json`, what PeftModel.save_pretrained
  writes (keys `base_model.model.<name>.lora_A.weight`), loadable with PeftModel.from_pretrained.
- `export_merged`: the full weights with every adapter merged in, through the family's own writer.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lumina_illus.config import ConfigError, LoRAConfig

ADAPTER = "default"  # peft adapter name inside the network
KOHYA_FILE = "lora.safetensors"
PEFT_DIR = "lora_peft"
_DOWN, _UP, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer."


def resolve_targets(net: nn.Module, patterns: list[str], where: str) -> list[str]:
    """Names of the Linear layers of `net` that any fnmatch pattern matches; a pattern matching none is a
    ConfigError naming it (with some names that exist)."""
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    found: set[str] = set()
    for pat in patterns:
        hits = fnmatch.filter(linear, pat)
        if not hits:
            raise ConfigError(f"{where}: lora.targets: {pat!r} matches no Linear layer of the "
                              f"{type(net).__name__} ({len(linear)} Linear layers, e.g. {linear[:4]})")
        found.update(hits)
    return sorted(found)


def apply_lora(net: nn.Module, cfg: LoRAConfig, default_targets: list[str], where: str) -> Any:
    """Freeze `net` and inject rank-`cfg.rank` adapters into the targeted Linear layers (in place);
    returns the peft LoraConfig (its target_modules: the full names chosen)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve_targets(net, cfg.targets or default_targets, where)
    modules = dict(net.named_modules())
    for n in names:
        m = modules[n]
        if cfg.rank > min(m.in_features, m.out_features):
            raise ConfigError(f"{where}: lora.rank = {cfg.rank} is larger than layer {n!r} "
                              f"({m.in_features} -> {m.out_features}): at most {min(m.in_features, m.out_features)}")
    net.requires_grad_(False)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                          init_lora_weights=True if cfg.init == "default" else "gaussian", bias="none")
    inject_adapter_in_model(peft_cfg, net, adapter_name=ADAPTER)
    for n, p in net.named_parameters():
        p.requires_grad_(".lora_" in n)
    return peft_cfg


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if ".lora_" in n]


def lora_weights(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Training-module state dict -> {module name (without `prefix`): (down (r, in), up (out, r))}."""
    out = {}
    for k, down in sd.items():
        if k.startswith(prefix) and k.endswith(_DOWN):
            name = k[len(prefix):-len(_DOWN)]
            out[name] = (down, sd[prefix + name + _UP])
    return out


def merged_state(sd: dict[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """The state dict the network would have without adapters, each one merged:
    W + scale * up @ down (computed in fp32, cast back); keys outside `prefix` pass through."""
    ups = lora_weights(sd, prefix)
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        key = k.replace(_BASE, ".") if k.startswith(prefix) else k
        name = key[len(prefix):].removesuffix(".weight")
        if k.startswith(prefix) and _BASE in k and k.endswith(".weight") and name in ups:
            down, up = ups[name]
            v = (v.float() + scale * (up.float() @ down.float())).to(v.dtype)
        out[key] = v
    return out


def write_kohya(path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], names: dict[str, str],
                cfg: LoRAConfig, metadata: dict[str, str]) -> Path:
    """`names`: module name -> kohya key stem (e.g. lora_unet_layers_0_attention_qkv)."""
    from safetensors.torch import save_file

    tensors = {}
    for n, (down, up) in weights.items():
        stem = names[n]
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(cfg.alpha), dtype=down.dtype)
    meta = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.alpha)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def write_peft(folder: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], peft_cfg: Any,
               metadata: dict[str, str]) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, (down, up) in weights.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = down.contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt", **metadata})
    peft_cfg.save_pretrained(str(folder))
    return [folder / "adapter_model.safetensors", folder / "adapter_config.json"]


def export_lora(
    sd: dict[str, torch.Tensor], out: Path, metadata: dict[str, Any], cfg: LoRAConfig, peft_cfg: Any, *,
    prefix: str, kohya_names: Callable[[list[str]], dict[str, str]],
    write_full: Callable[[dict[str, torch.Tensor]], list[Path]],
) -> list[Path]:
    """The LoRA files of `cfg.formats` from a training-module state dict, plus the merged full weights
    (through `write_full`) when `cfg.export_merged`. `kohya_names`: module names -> {name: kohya key stem}."""
    from lumina_illus.families import METADATA_KEY

    weights = lora_weights(sd, prefix)
    if not weights:
        raise ValueError(f"export to {out}: the state dict holds no LoRA weights under {prefix!r}")
    meta = {METADATA_KEY: json.dumps(metadata)}
    files: list[Path] = []
    if "comfy" in cfg.formats:
        files.append(write_kohya(Path(out) / KOHYA_FILE, weights, kohya_names(sorted(weights)), cfg, meta))
    if "peft" in cfg.formats:
        files += write_peft(Path(out) / PEFT_DIR, weights, peft_cfg, meta)
    if cfg.export_merged:
        files += write_full(merged_state(sd, prefix, cfg.alpha / cfg.rank))
    return files


@torch.no_grad()
def merge_kohya_file(net: nn.Module, path: Path, kohya_names: dict[str, str]) -> int:
    """Add a kohya-format LoRA file into the Linear weights of a plain network (no adapters), by the
    rule ComfyUI applies: W += (alpha / rank) * up @ down. Returns the layers merged; keys that map to
    no layer are an error."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    by_stem = {stem: n for n, stem in kohya_names.items()}
    modules = dict(net.named_modules())
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    unknown = sorted(stems - set(by_stem))
    if unknown:
        raise KeyError(f"{path}: LoRA keys for no layer of this network: {unknown[:5]}")
    for stem in stems:
        down, up = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else down.shape[0]
        w = modules[by_stem[stem]].weight
        w += (alpha / down.shape[0] * (up @ down)).to(w.device, w.dtype)  # the file's tensors are on the CPU
    return len(stems)
