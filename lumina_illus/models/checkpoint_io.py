"""Read and write NextDiT weights in the three public layouts, detected automatically.

Layouts (our module's own parameter names ARE the original layout):
  original   Alpha-VLLM keys (`layers.N.attention.qkv.weight`, ..., `norm_final.weight`);
             read from .safetensors or .pth (torch.load(weights_only=True)); written as safetensors.
  comfy      ComfyUI single file: original keys under the prefix `model.diffusion_model.`.
  diffusers  folder with config.json + diffusion_pytorch_model.safetensors, loadable by
             `diffusers.Lumina2Transformer2DModel.from_pretrained`; q/k/v split, no norm_final
             (set to ones, its initial value, when read back).
  official   the folder the official `sample.py` of Lumina-Image-2.0 reads with `--ckpt DIR`:
             consolidated.00-of-01.pth (original keys, torch.save) and model_args.pth (the pickled
             argparse.Namespace whose `.model` names the NextDiT factory of the official models/model.py,
             e.g. NextDiT_2B_GQA_patch2_Adaln_Refiner); consolidated_ema.00-of-01.pth beside them when
             present is the EMA. Read: the non-EMA file (`load_checkpoint(..., ema=True)`: the EMA one),
             model_args.pth with weights_only=True (argparse.Namespace allow-listed) and its factory's
             architecture checked against the weights. Written only for the official architectures.

File names we write (stable; the Lumina family's export and `load_generator` rely on them):
  <dir>/lumina2.safetensors         original layout
  <dir>/lumina2_comfy.safetensors   ComfyUI layout
  <dir>/diffusers/                  diffusers folder (export_layouts); save_layout("diffusers") writes <dir> itself
  <dir>/official/                   official folder (export_layouts); save_layout("official") writes <dir> itself

Every safetensors file we write carries our NextDiTConfig as JSON under the header key "nextdit_config"
and, when given, the run metadata as JSON under families.METADATA_KEY ("lumina_illus"). Files from
elsewhere have no config: it is inferred from the tensor shapes (`infer_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lumina_illus.families import METADATA_KEY
from lumina_illus.models.nextdit import NextDiT, NextDiTConfig

LAYOUTS = ("original", "diffusers", "comfy", "official")
ORIGINAL_FILE = "lumina2.safetensors"
COMFY_FILE = "lumina2_comfy.safetensors"
DIFFUSERS_DIR = "diffusers"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMFY_PREFIX = "model.diffusion_model."
CONFIG_KEY = "nextdit_config"
OFFICIAL_DIR = "official"
OFFICIAL_WEIGHTS = "consolidated.00-of-01.pth"
OFFICIAL_EMA_WEIGHTS = "consolidated_ema.00-of-01.pth"
OFFICIAL_ARGS = "model_args.pth"
# the NextDiT factories of the official models/model.py (Alpha-VLLM/Lumina-Image-2.0), which its
# sample.py calls as factory(in_channels=16, qk_norm=True, cap_feat_dim=<text encoder hidden size>);
# every other field keeps the official NextDiT default (= our NextDiTConfig default)
OFFICIAL_FACTORIES: dict[str, dict[str, Any]] = {
    "NextDiT_2B_GQA_patch2_Adaln_Refiner": dict(dim=2304, n_layers=26, n_heads=24, n_kv_heads=8, axes_dims=(32, 32, 32)),
    "NextDiT_3B_GQA_patch2_Adaln_Refiner": dict(dim=2592, n_layers=30, n_heads=24, n_kv_heads=8, axes_dims=(36, 36, 36)),
    "NextDiT_4B_GQA_patch2_Adaln_Refiner": dict(dim=2880, n_layers=32, n_heads=24, n_kv_heads=8, axes_dims=(40, 40, 40)),
    "NextDiT_7B_GQA_patch2_Adaln_Refiner": dict(dim=3840, n_layers=32, n_heads=32, n_kv_heads=8, axes_dims=(40, 40, 40)),
}
_RUNTIME_FIELDS = ("attention", "activation_checkpointing")


def official_config(factory: str, cap_feat_dim: int) -> NextDiTConfig:
    """The NextDiTConfig the official sample.py builds with `factory` (KeyError if it is not one)."""
    return NextDiTConfig(**OFFICIAL_FACTORIES[factory], in_channels=16, cap_feat_dim=cap_feat_dim)


def _architecture(cfg: NextDiTConfig) -> dict[str, Any]:
    """What the weights are: the FFN size itself, not the rounding rule that produced it."""
    skip = (*_RUNTIME_FIELDS, "multiple_of", "ffn_dim_multiplier")
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}, "ffn_hidden": cfg.ffn_hidden}


def official_factory(cfg: NextDiTConfig) -> str:
    """The official factory building exactly `cfg`'s architecture; CheckpointError when none does."""
    for name in OFFICIAL_FACTORIES:
        if _architecture(official_config(name, cfg.cap_feat_dim)) == _architecture(cfg):
            return name
    raise CheckpointError(
        f"the official layout needs one of the official architectures ({', '.join(OFFICIAL_FACTORIES)}); "
        f"this model (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, in_channels "
        f"{cfg.in_channels}, ...) is none of them: the official sample.py could not build it")


def read_model_args(path: Path) -> argparse.Namespace:
    """model_args.pth of an official folder, unpickled with weights_only=True (only argparse.Namespace
    and plain values allowed: a pickle cannot run code here)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            args = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError naming the disallowed global, or a corrupt file
        raise CheckpointError(f"{path}: cannot read as an official model_args.pth (weights_only): {e}") from None
    if not isinstance(args, argparse.Namespace) or not isinstance(getattr(args, "model", None), str):
        raise CheckpointError(f"{path}: expected an argparse.Namespace with a 'model' name, got {type(args).__name__}")
    return args

# original -> diffusers renames inside a block; modulated blocks keep attention_norm1 inside norm1
_BLOCK_RENAMES = [
    ("attention.out.", "attn.to_out.0."),
    ("attention.q_norm.", "attn.norm_q."),
    ("attention.k_norm.", "attn.norm_k."),
    ("feed_forward.w1.", "feed_forward.linear_1."),
    ("feed_forward.w2.", "feed_forward.linear_2."),
    ("feed_forward.w3.", "feed_forward.linear_3."),
    ("attention_norm2.", "norm2."),
    ("adaLN_modulation.1.", "norm1.linear."),
]
_TOP_RENAMES = [
    ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
    ("cap_embedder.", "time_caption_embed.caption_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
    ("final_layer.linear.", "norm_out.linear_2."),
]
_BLOCK_RE = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the file and the offending keys."""


# ---------------------------------------------------------------------------------------------
# key mapping between layouts (pure functions on state dicts)


def original_to_diffusers(state: dict[str, torch.Tensor], cfg: NextDiTConfig) -> dict[str, torch.Tensor]:
    out = {}
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for key, value in state.items():
        if key == "norm_final.weight":
            continue  # unused in forward; diffusers has no such parameter
        m = _BLOCK_RE.match(key)
        if m is None:
            out[_rename(key, _TOP_RENAMES)] = value
            continue
        group, idx, rest = m.groups()
        prefix = f"{group}.{idx}."
        if rest == "attention.qkv.weight":
            q, k, v = value.split([q_dim, kv_dim, kv_dim], dim=0)
            out[prefix + "attn.to_q.weight"] = q.contiguous()
            out[prefix + "attn.to_k.weight"] = k.contiguous()
            out[prefix + "attn.to_v.weight"] = v.contiguous()
            continue
        if rest.startswith("attention_norm1."):
            modulated = group != "context_refiner"
            rest = rest.replace("attention_norm1.", "norm1.norm." if modulated else "norm1.")
        out[prefix + _rename(rest, _BLOCK_RENAMES)] = value
    return out


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    inverse_block = [(b, a) for a, b in _BLOCK_RENAMES]
    inverse_top = [(b, a) for a, b in _TOP_RENAMES]
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            out[_rename(key, inverse_top)] = value
            continue
        group, idx, rest = m.groups()
        prefix = f"{group}.{idx}."
        part = re.fullmatch(r"attn\.to_([qkv])\.weight", rest)
        if part:
            qkv.setdefault(prefix, {})[part.group(1)] = value
            continue
        if rest.startswith("norm1.norm."):
            rest = rest.replace("norm1.norm.", "attention_norm1.")
        elif rest.startswith("norm1.") and not rest.startswith("norm1.linear."):
            rest = rest.replace("norm1.", "attention_norm1.")
        out[prefix + _rename(rest, inverse_block)] = value
    for prefix, parts in qkv.items():
        missing = [f"{prefix}attn.to_{p}.weight" for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"missing keys: {missing}")
        out[prefix + "attention.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    # diffusers drops the unused norm_final; restore its initial value so every original key exists
    if "x_embedder.weight" in out:
        ref = out["x_embedder.weight"]
        out["norm_final.weight"] = torch.ones(ref.shape[0], dtype=ref.dtype)
    return out


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def to_layout(state: dict[str, torch.Tensor], cfg: NextDiTConfig, layout: str) -> dict[str, torch.Tensor]:
    """Original-layout state dict -> `layout` keys."""
    _check_layout(layout)
    if layout == "diffusers":
        return original_to_diffusers(state, cfg)
    if layout == "comfy":
        return {COMFY_PREFIX + k: v for k, v in state.items()}
    return dict(state)


def from_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """`layout` keys -> original-layout state dict. ComfyUI files may also hold other models
    (VAE, text encoder) under other prefixes; only the diffusion model's keys are taken."""
    _check_layout(layout)
    if layout == "diffusers":
        return diffusers_to_original(state)
    if layout == "comfy":
        return {k[len(COMFY_PREFIX) :]: v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    return dict(state)


def detect_layout(keys: list[str] | set[str]) -> str:
    """Which layout a set of tensor names is in."""
    keys = set(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    if any(k.startswith("time_caption_embed.") or ".attn.to_q." in k for k in keys):
        return "diffusers"
    if any(k.startswith("cap_embedder.") or ".attention.qkv." in k for k in keys):
        return "original"
    raise CheckpointError(f"not a NextDiT checkpoint: none of the known key patterns in {sorted(keys)[:8]}...")


# ---------------------------------------------------------------------------------------------
# configs: diffusers config.json <-> NextDiTConfig, and inference from tensor shapes


def to_diffusers_config(cfg: NextDiTConfig) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "Lumina2Transformer2DModel",
        "_diffusers_version": diffusers.__version__,
        "sample_size": 128,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "hidden_size": cfg.dim,
        "num_layers": cfg.n_layers,
        "num_refiner_layers": cfg.n_refiner_layers,
        "num_attention_heads": cfg.n_heads,
        "num_kv_heads": cfg.n_kv_heads,
        "multiple_of": cfg.multiple_of,
        "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
        "norm_eps": cfg.norm_eps,
        "scaling_factor": 1.0,
        "axes_dim_rope": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens),
        "cap_feat_dim": cfg.cap_feat_dim,
    }


def from_diffusers_config(d: dict[str, Any], where: str) -> NextDiTConfig:
    out_ch = d.get("out_channels")
    if out_ch not in (None, d.get("in_channels", 16)):
        raise CheckpointError(f"{where}: out_channels={out_ch} != in_channels is not supported")
    try:
        return NextDiTConfig(
            patch_size=d.get("patch_size", 2),
            in_channels=d.get("in_channels", 16),
            dim=d.get("hidden_size", 2304),
            n_layers=d.get("num_layers", 26),
            n_refiner_layers=d.get("num_refiner_layers", 2),
            n_heads=d.get("num_attention_heads", 24),
            n_kv_heads=d.get("num_kv_heads", 8),
            multiple_of=d.get("multiple_of", 256),
            ffn_dim_multiplier=d.get("ffn_dim_multiplier"),
            norm_eps=d.get("norm_eps", 1e-5),
            cap_feat_dim=d.get("cap_feat_dim", 1024),
            axes_dims=tuple(d.get("axes_dim_rope", (32, 32, 32))),
            axes_lens=tuple(d.get("axes_lens", (300, 512, 512))),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: invalid config: {e}") from None


def infer_config(state: dict[str, torch.Tensor], where: str = "<state dict>", patch_size: int = 2) -> NextDiTConfig:
    """NextDiTConfig from original-layout tensor shapes. Not recoverable from shapes, and taken as the
    Lumina-2 values: patch_size (2; the embedder only sees patch^2 * channels), RoPE axes (head_dim split
    in three equal parts), theta, axes_lens and eps."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise CheckpointError(f"{where}: missing key {key!r}; cannot infer the architecture")
        return state[key].shape

    def count(group: str) -> int:
        return len({int(m.group(2)) for k in state if (m := _BLOCK_RE.match(k)) and m.group(1) == group})

    dim, patch_in = shape("x_embedder.weight")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    n_heads = dim // head_dim
    n_kv_heads = (shape("layers.0.attention.qkv.weight")[0] // head_dim - n_heads) // 2
    hidden = shape("layers.0.feed_forward.w1.weight")[0]
    multiple_of, mult = 256, None
    if 256 * ((4 * dim + 255) // 256) != hidden:  # not the default rounding: state the hidden size exactly
        multiple_of, mult = 1, hidden / (4 * dim)
    if head_dim % 6:
        raise CheckpointError(f"{where}: head_dim {head_dim} cannot be split into 3 even RoPE axes")
    cfg = NextDiTConfig(
        patch_size=patch_size,
        in_channels=patch_in // patch_size**2,
        dim=dim,
        n_layers=count("layers"),
        n_refiner_layers=count("noise_refiner"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        cap_feat_dim=shape("cap_embedder.0.weight")[0],
        axes_dims=(head_dim // 3,) * 3,
    )
    if cfg.ffn_hidden != hidden:
        raise CheckpointError(f"{where}: cannot express FFN hidden size {hidden} as a NextDiTConfig")
    return cfg


# ---------------------------------------------------------------------------------------------
# files


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if path.suffix in (".pth", ".pt", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
        return obj, {}
    raise CheckpointError(f"{path}: unsupported file type {path.suffix!r} (use .safetensors or .pth)")


def _find_weights(path: Path, ema: bool = False) -> tuple[list[Path], Path | None]:
    """Weight files and (for diffusers folders) config.json, or (official folders) model_args.pth."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / OFFICIAL_ARGS).is_file():
        weights = path / (OFFICIAL_EMA_WEIGHTS if ema else OFFICIAL_WEIGHTS)
        shards = sorted(path.glob("consolidated.*-of-*.pth"))
        if not weights.is_file():
            found = sorted(p.name for p in path.glob("consolidated*.pth"))
            raise CheckpointError(f"{path}: an official folder ({OFFICIAL_ARGS}) without {weights.name}; found {found}"
                                  + (" (model-parallel shards: merge them first)" if len(shards) > 1 else ""))
        return [weights], path / OFFICIAL_ARGS
    if (path / "config.json").is_file():
        shards = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if shards:
            return shards, path / "config.json"
    for name in (ORIGINAL_FILE, COMFY_FILE):
        if (path / name).is_file():
            return [path / name], None
    if (path / DIFFUSERS_DIR / "config.json").is_file():
        return _find_weights(path / DIFFUSERS_DIR)
    if (path / OFFICIAL_DIR / OFFICIAL_ARGS).is_file():
        return _find_weights(path / OFFICIAL_DIR, ema)
    candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
    if len(candidates) == 1:
        return candidates, None
    raise CheckpointError(
        f"{path}: expected {ORIGINAL_FILE}, {COMFY_FILE}, a diffusers folder (config.json + {DIFFUSERS_WEIGHTS}) "
        f"or exactly one .safetensors/.pth file; found {[c.name for c in candidates]}"
    )


def load_checkpoint(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], NextDiTConfig]:
    """Any layout -> (original-layout state dict, config), with keys checked against the model.
    `ema` picks consolidated_ema.00-of-01.pth in an official folder (other layouts keep EMA elsewhere)."""
    path = Path(path)
    files, config_json = _find_weights(path, ema)
    state: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {}
    for f in files:
        tensors, meta = _read_tensors(f)
        state.update(tensors)
        header = header or meta
    where = str(files[0] if len(files) == 1 else path)
    layout = detect_layout(state.keys())
    original = from_layout(state, layout)
    if config_json is not None and config_json.name == OFFICIAL_ARGS:
        args = read_model_args(config_json)
        cfg = infer_config(original, where)
        if args.model not in OFFICIAL_FACTORIES:
            raise CheckpointError(f"{config_json}: model {args.model!r} is not an official NextDiT factory "
                                  f"({', '.join(OFFICIAL_FACTORIES)})")
        expected = official_config(args.model, cfg.cap_feat_dim)
        have = _architecture(cfg)
        diff = {k: (v, have[k]) for k, v in _architecture(expected).items() if have[k] != v}
        if diff:
            raise CheckpointError(f"{config_json}: model {args.model!r} does not match the weights in "
                                  f"{files[0].name} (field: factory value, weights value): {diff}")
        cfg = expected
    elif config_json is not None:
        cfg = from_diffusers_config(json.loads(config_json.read_text()), str(config_json))
    elif CONFIG_KEY in header:
        cfg = NextDiTConfig(**json.loads(header[CONFIG_KEY]))
    else:
        cfg = infer_config(original, where)
    check_keys(original, cfg, f"{where} ({layout} layout)")
    return original, cfg


def check_keys(state: dict[str, torch.Tensor], cfg: NextDiTConfig, where: str) -> None:
    """Raise CheckpointError listing missing and unexpected keys (original-layout names), then shape mismatches."""
    with torch.device("meta"):
        expected = NextDiT(cfg).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: checkpoint does not match the NextDiT config (key names in the original layout)\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}"
        )
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{where}: tensor shapes differ from the config: {bad}")


def save_layout(
    state: dict[str, torch.Tensor],
    cfg: NextDiTConfig,
    out_dir: Path,
    layout: str,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write an original-layout state dict in `layout` under out_dir (file names in the module docstring);
    dtype None keeps each tensor's dtype. Returns the written paths."""
    _check_layout(layout)
    check_keys(state, cfg, "<state dict to save>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in to_layout(state, cfg, layout).items()}
    header = {"format": "pt", CONFIG_KEY: json.dumps(cfg.to_dict())}
    if metadata is not None:
        header[METADATA_KEY] = json.dumps(metadata)
    if layout == "official":
        factory = official_factory(cfg)
        weights = out_dir / OFFICIAL_WEIGHTS
        tmp = weights.with_name(weights.name + ".tmp")
        torch.save(tensors, tmp)  # what the official sample.py torch.loads
        tmp.replace(weights)
        args = argparse.Namespace(model=factory, qk_norm=True, model_parallel_size=1, lumina_illus=header)
        torch.save(args, out_dir / OFFICIAL_ARGS)
        return [weights, out_dir / OFFICIAL_ARGS]
    if layout == "diffusers":
        weights = out_dir / DIFFUSERS_WEIGHTS
        _save_atomic(tensors, weights, header)
        config = out_dir / "config.json"
        config.write_text(json.dumps(to_diffusers_config(cfg), indent=2) + "\n")
        return [config, weights]
    path = out_dir / (ORIGINAL_FILE if layout == "original" else COMFY_FILE)
    _save_atomic(tensors, path, header)
    return [path]


def export_layouts(
    state_dict: dict[str, torch.Tensor],
    config: NextDiTConfig,
    out_dir: str | Path,
    layouts: list[str] | tuple[str, ...] = ("original", "diffusers", "comfy"),
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> list[Path]:
    """Export one set of weights in several layouts: out_dir/lumina2.safetensors (original),
    out_dir/lumina2_comfy.safetensors (comfy), out_dir/diffusers/ (diffusers folder), out_dir/official/.
    A state dict without `norm_final.weight` (e.g. gathered trainable parameters only) gets ones."""
    out_dir = Path(out_dir)
    state = dict(state_dict)
    if "norm_final.weight" not in state:
        state["norm_final.weight"] = torch.ones(config.dim)
    paths: list[Path] = []
    for layout in layouts:
        target = out_dir / {"diffusers": DIFFUSERS_DIR, "official": OFFICIAL_DIR}.get(layout, "")
        paths += save_layout(state, config, target, layout, metadata=metadata, dtype=dtype)
    return paths


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")


# ---------------------------------------------------------------------------------------------
# models (nextdit.py holds the architecture only; reading and writing files lives here)


def load_nextdit(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 ema: bool = False) -> NextDiT:
    """A NextDiT from any layout (original, diffusers folder, ComfyUI file, official folder), detected
    automatically. The checkpoint holds the model, not how its run ran: the attention backend and
    activation checkpointing start at their defaults."""
    state, cfg = load_checkpoint(path, ema=ema)
    cfg = dataclasses.replace(cfg, attention="auto", activation_checkpointing=False)
    with torch.device("meta"):
        model = NextDiT(cfg)
    model.load_state_dict(state, assign=True)
    model.norm_final.weight.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def save_nextdit(model: NextDiT, out_dir: str | Path, layout: str = "original",
                 metadata: dict[str, Any] | None = None) -> list[Path]:
    """Write a NextDiT's weights in `layout` under out_dir (file names in the module docstring)."""
    return save_layout(model.state_dict(), model.config, Path(out_dir), layout, metadata=metadata, dtype=None)
