"""The "lumina2" family: NextDiT + frozen Gemma-2 + Flux VAE + rectified flow + flow sampler.

Run config `model:` section (validated by `Lumina2Config`):

    model:
      arch: {preset: tiny}            # or NextDiTConfig fields, or {preset: 2b, attention: sdpa}
      pretrained: /models/lumina2     # any layout checkpoint_io.load_nextdit reads; null: random init
      text_encoder: {path: /models/gemma-2-2b}
      vae: {path: /models/flux-ae}
      objective: {timestep: logit_normal, shift: resolution}
      sampler: {steps: 30, shift: 6.0, guidance: 4.0}

The training module owns exactly the trainable parameters: the NextDiT (`dit.*`) and, only when
`text_encoder.trainable`, Gemma (`text_encoder.*`, its own LR group). The VAE and a frozen Gemma
live beside it and run in `prepare` under no_grad, unless the batch brings cached latents and Gemma
features (data/cache_latents.py --text-embeds). A trainable Gemma on such a cache is deliberate and
announced at start: the frozen features go unused and Gemma encodes the batch's captions, which are the
cached caption variants a frozen run on the same cache draws, so frozen vs trainable (experiments/run.sh
q1) compare on the same latents and captions. (SDXL refuses trainable CLIPs on its cache instead.) With `lora.enabled` the NextDiT is frozen and only
its adapters (models/lora.py, default targets LORA_TARGETS) train and export.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from lumina_illus.config import ConfigError, from_dict, to_dict
from lumina_illus.data.shards import text_feature_cache
from lumina_illus.families import (
    METADATA_KEY,
    CacheEncoders,
    LossOutput,
    TrainingParts,
    check_sizes,
    read_metadata,
)
from lumina_illus.models.attention import resolve_backend
from lumina_illus.models.checkpoint_io import CheckpointError, load_nextdit, official_factory
from lumina_illus.models.lora import KOHYA_FILE, apply_lora, export_lora, merge_kohya_file
from lumina_illus.models.nextdit import NextDiT, NextDiTConfig, nextdit_2b, nextdit_tiny
from lumina_illus.models.text_encoder import GemmaTextEncoder, TextEncoderConfig
from lumina_illus.models.vae import LatentCodec, VAEConfig
from lumina_illus.objectives.flow_matching import FlowMatching, FlowMatchingConfig
from lumina_illus.sampling.flow import FlowSamplerConfig, LuminaGenerator

if TYPE_CHECKING:
    from lumina_illus.config import RunConfig
    from lumina_illus.data.batch import Batch

PRESETS = {"2b": nextdit_2b, "tiny": nextdit_tiny}
TEXT_ENCODER_DIR = "text_encoder"  # fine-tuned Gemma beside the DiT export: a transformers folder
TEXT_ENCODER_FILE = "text_encoder.safetensors"  # the same weights as one file (exports before the folder)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack")
# NextDiTConfig fields that change how the model runs, not what it is: allowed beside `pretrained`
_RUNTIME_FIELDS = {"attention", "activation_checkpointing"}
# LoRA targets when lora.targets is empty: attention and SwiGLU of every block (main, both refiners)
LORA_TARGETS = ["*.attention.qkv", "*.attention.out", "*.feed_forward.w*"]


@dataclass
class Lumina2Config:
    arch: dict[str, Any] = field(default_factory=lambda: {"preset": "2b"})  # NextDiTConfig fields; "preset" picks defaults
    pretrained: str | None = None  # checkpoint to start from (any layout); None: random init from `arch`
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    objective: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    sampler: FlowSamplerConfig = field(default_factory=FlowSamplerConfig)
    compile: bool = False  # torch.compile each transformer block, dynamic shapes (NextDiT.compile_blocks)

    def __post_init__(self) -> None:
        self.nextdit()  # validate now, so a bad arch fails at config load with its key named

    def nextdit(self) -> NextDiTConfig:
        """The NextDiTConfig of `arch`: preset defaults overridden by the other keys."""
        fields = dict(self.arch)
        preset = fields.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"arch.preset: {preset!r} is not one of {sorted(PRESETS)}")
        if preset is not None:
            # overrides are checked together with the preset's other fields (dim=128 on "tiny" keeps its heads)
            fields = {**dataclasses.asdict(PRESETS[preset]()), **fields}
        try:
            return from_dict(NextDiTConfig, fields, where="model.arch", prefix="model.arch.")
        except ConfigError as e:
            raise ValueError(str(e)) from None


class Lumina2TrainingModule(nn.Module):
    """What DeepSpeed wraps: trainable parameters only; forward computes the flow-matching loss."""

    def __init__(self, dit: NextDiT, objective: FlowMatching, text_encoder: GemmaTextEncoder | None = None) -> None:
        super().__init__()
        self.dit = dit
        self.text_encoder = text_encoder  # a submodule only when it trains
        self.objective = objective

    def forward(
        self,
        latents: list[torch.Tensor],  # B x (C, h, w) clean latents x1
        noise: list[torch.Tensor],  # B x (C, h, w) x0
        t: torch.Tensor,  # (B,) Lumina time
        cap_feats: torch.Tensor | None = None,  # (B, L, D) frozen text features, or
        cap_mask: torch.Tensor | None = None,  # (B, L) bool
        input_ids: torch.Tensor | None = None,  # (B, L) token ids when the text encoder trains
        attention_mask: torch.Tensor | None = None,  # (B, L)
    ) -> LossOutput:
        if input_ids is not None:
            cap_feats, cap_mask = self.text_encoder(input_ids, attention_mask)
        dtype = next(self.dit.parameters()).dtype
        xt = self.objective.noisy_input(latents, noise, t)  # B x (C, h, w), fp32 mix
        pred = self.dit([x.to(dtype) for x in xt], t, cap_feats.to(dtype), cap_mask)  # B x (C, h, w)
        loss, per_sample = self.objective.loss(pred, self.objective.target(latents, noise))
        return LossOutput(loss=loss, per_sample=per_sample, t=t.detach(), extras=self.objective.t_bin_losses(per_sample, t))


class Lumina2Family:
    name = "lumina2"
    size_multiple = 16  # image sides: Flux VAE 8x down, then 2x2 patches
    config_cls = Lumina2Config

    # -- training ----------------------------------------------------------------------------------

    def build_training(self, cfg: RunConfig, device: torch.device) -> TrainingParts:
        mc: Lumina2Config = cfg.model
        # the sample grid and in-training recall sizes: refused now, not at the first grid
        check_sizes(cfg.sampling.sizes, self.size_multiple, f"{cfg.source}: sampling.sizes", ConfigError)
        dit = build_dit(mc, cfg.source).to(device)
        if "official" in cfg.checkpoint.export_layouts:
            try:  # the official sample.py builds only its own factories: refuse now, not at the first export
                official_factory(dit.config)
            except CheckpointError as e:
                raise ConfigError(f"{cfg.source}: checkpoint.export_layouts has 'official' but {e}") from None
        peft_cfg = None
        if cfg.lora.enabled:
            if mc.text_encoder.trainable:
                raise ConfigError(f"{cfg.source}: lora.enabled with model.text_encoder.trainable: a LoRA run trains "
                                  "adapters on the NextDiT only; set model.text_encoder.trainable: false")
            if cfg.lora.timestep_sampling is not None:  # in the run config itself, so config.yaml shows it
                mc.objective.timestep = cfg.lora.timestep_sampling
            peft_cfg = apply_lora(dit, cfg.lora, LORA_TARGETS, cfg.source)  # base frozen, adapters trainable
        # "auto" becomes the backend that will run, in the run config itself, so that config.yaml and
        # the W&B config name it (DeepSpeed bf16 casts the model, and so q/k/v, to bf16)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        asked = dit.config.attention
        mc.arch["attention"] = resolve_backend(asked, device, dtype)
        dit.set_attention_backend(mc.arch["attention"])
        if cfg.train.activation_checkpointing is not False:
            dit.set_activation_checkpointing(cfg.train.activation_checkpointing)
        if mc.compile:
            dit.compile_blocks()
        if not dist.is_initialized() or dist.get_rank() == 0:
            recompute = sum(b.recompute for b in dit.blocks())
            print(f"[model] attention backend {mc.arch['attention']} (asked: {asked}), "
                  f"activation checkpointing {recompute}/{len(dit.blocks())} blocks, compile {mc.compile}", flush=True)
        cache = text_feature_cache(cfg.data) if mc.text_encoder.trainable else None
        if cache is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"[model] model.text_encoder.trainable on a cache of frozen Gemma features ({cache}): the features "
                  "go unused; the trainable Gemma encodes the cached captions (the variants a frozen run draws)",
                  flush=True)
        if mc.text_encoder.trainable and not (mc.text_encoder.lr or cfg.optim.text_encoder_lr):
            raise ConfigError(f"{cfg.source}: model.text_encoder.trainable needs its own learning rate: set "
                              "model.text_encoder.lr (or optim.text_encoder_lr); a pretrained LLM usually wants "
                              "5-20x below the DiT's optim.lr")
        try:
            text_encoder = GemmaTextEncoder(mc.text_encoder, device)
        except (ValueError, FileNotFoundError) as e:  # messages start with the key: text_encoder.path ...
            raise ConfigError(f"{cfg.source}: model.{e}") from None
        if text_encoder.dim != dit.config.cap_feat_dim:
            raise ConfigError(
                f"{cfg.source}: model.text_encoder.path {mc.text_encoder.path} has hidden size {text_encoder.dim} "
                f"but the NextDiT expects cap_feat_dim {dit.config.cap_feat_dim}"
            )
        codec = LatentCodec(mc.vae, device)
        if codec.latent_channels != dit.config.in_channels:
            raise ConfigError(
                f"{cfg.source}: model.vae.path {mc.vae.path} has {codec.latent_channels} latent channels "
                f"but the NextDiT expects in_channels {dit.config.in_channels}"
            )
        objective = FlowMatching(mc.objective)
        trains_te = mc.text_encoder.trainable
        module = Lumina2TrainingModule(dit, objective, text_encoder if trains_te else None)
        groups: list[dict[str, Any]] = [
            {"name": "dit", "params": [p for p in dit.parameters() if p.requires_grad], "lr": cfg.optim.lr}
        ]
        if trains_te:
            lr = mc.text_encoder.lr or cfg.optim.text_encoder_lr
            groups.append(
                {"name": "text_encoder", "params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": lr}
            )
        patch = dit.config.patch_size

        def prepare(batch: Batch, generator: torch.Generator, t: torch.Tensor | None = None) -> dict[str, Any]:
            with torch.no_grad():
                if batch.latents is not None:
                    latents = [z.to(device, torch.float32) for z in batch.latents]
                elif batch.images is not None:
                    latents = codec.encode([img.to(device) for img in batch.images])
                else:
                    raise ValueError(f"batch {batch.keys[:3]}...: holds neither images nor latents")
                if t is None:  # given: validation's fixed noise levels
                    t = objective.sample_t([z.shape[1] * z.shape[2] // patch**2 for z in latents], generator)
                noise = objective.sample_noise(latents, generator)
                inputs: dict[str, Any] = {"latents": latents, "noise": noise, "t": t.to(device)}
                if trains_te:
                    inputs["input_ids"], inputs["attention_mask"] = text_encoder.tokenize(batch.captions)
                elif batch.text_embeds is not None:
                    if batch.text_pooled is not None:
                        raise ValueError(f"batch {batch.keys[:3]}: cached text features with 'text_pooled': an SDXL "
                                         f"cache, not Gemma features; data.shards in {cfg.source}")
                    inputs["cap_feats"], inputs["cap_mask"] = pad_features(batch.text_embeds, device)
                else:
                    inputs["cap_feats"], inputs["cap_mask"] = text_encoder.encode(batch.captions)
            return inputs

        def image_tokens(batch: Batch) -> list[int]:
            if batch.latents is not None:
                return [z.shape[1] * z.shape[2] // patch**2 for z in batch.latents]
            f = codec.downscale * patch
            return [img.shape[1] * img.shape[2] // f**2 for img in batch.images or []]

        te_params = sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)

        def flops(batch: Batch) -> float:
            # forward + backward = 3x forward; the frozen encoder's forward is not training work
            cap = text_encoder.tokenize(batch.captions)[1].sum(1).tolist()
            total = sum(dit.flops(n, c) for n, c in zip(image_tokens(batch), cap))
            total += 2 * te_params * sum(cap)  # a trainable Gemma: 2 FLOPs per parameter per token
            return 3.0 * total

        def export(state_dict: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, Any]) -> list[Path]:
            def full(sd: dict[str, torch.Tensor]) -> list[Path]:
                return export_weights(sd, dit.config, Path(out_dir), metadata, cfg.checkpoint.export_layouts)

            if peft_cfg is None:
                return full(state_dict)
            return export_lora(state_dict, Path(out_dir), metadata, cfg.lora, peft_cfg, prefix="dit.",
                               kohya_names=kohya_names, write_full=full)

        def generator(live: nn.Module) -> LuminaGenerator:
            live = getattr(live, "module", live)  # a DeepSpeed engine holds the module
            te = live.text_encoder if live.text_encoder is not None else text_encoder
            return LuminaGenerator(live.dit, te, codec, mc.sampler, patch_size=patch)

        return TrainingParts(
            module=module,
            param_groups=groups,
            prepare=prepare,
            flops=flops,
            export=export,
            generator=generator,
            tokens=lambda b: sum(image_tokens(b)),
        )

    def cache_encoders(self, cfg: RunConfig, text: bool) -> CacheEncoders:
        """Flux VAE of model.vae.path and, with `text`, Gemma-2 features of the caption's real tokens
        (Lumina's system prompt included), the (L, D) rows `prepare` pads back with pad_features."""
        mc: Lumina2Config = cfg.model
        if not mc.vae.path:
            raise ConfigError(f"{cfg.source}: model.vae.path must name a local VAE folder")

        def load(device: torch.device) -> tuple[LatentCodec, Any]:
            codec = LatentCodec(mc.vae, device=device)
            if not text:
                return codec, None
            te = GemmaTextEncoder(mc.text_encoder, device=device)

            def features(captions: list[str]) -> list[dict[str, torch.Tensor]]:
                feats, mask = te.encode(captions)  # (K, L, D), (K, L) right padded
                return [{"text_embeds": f[m]} for f, m in zip(feats, mask)]  # K x (L_k, D)

            return codec, features

        return CacheEncoders({"vae": to_dict(mc.vae), "text_encoder": to_dict(mc.text_encoder) if text else None}, load)

    # -- checkpoints -------------------------------------------------------------------------------

    def load_generator(self, path: str | Path, device: torch.device | str = "cpu", **kwargs: Any) -> LuminaGenerator:
        """Sampler over an exported checkpoint: a ckpt/step_X folder (its ema/ weights when present),
        one exported file (original/ComfyUI layout) or a diffusers transformer folder.

        kwargs: text_encoder_path, vae_path (needed for checkpoints without our metadata),
        dtype ("fp32" | "bf16" | "fp16", default fp32 on CPU and bf16 on GPU), and any
        FlowSamplerConfig field (steps, guidance, shift, ...)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
        weights = path / "ema" if path.is_dir() and _has_weights(path / "ema") else path
        meta = read_metadata(weights) or read_metadata(path)
        model_cfg = _model_config_from_metadata(meta, path)
        te_cfg = dataclasses.replace(model_cfg.text_encoder, trainable=False)
        vae_cfg = model_cfg.vae
        user_te = bool(kwargs.get("text_encoder_path"))  # an explicit encoder wins over a fine-tuned one
        if kwargs.get("text_encoder_path"):
            te_cfg = dataclasses.replace(te_cfg, path=str(kwargs.pop("text_encoder_path")))
        if kwargs.get("vae_path"):
            vae_cfg = dataclasses.replace(vae_cfg, path=str(kwargs.pop("vae_path")))
        kwargs.pop("text_encoder_path", None)
        kwargs.pop("vae_path", None)
        for name, value in (("text_encoder", te_cfg.path), ("vae", vae_cfg.path)):
            if not value:
                raise ValueError(
                    f"{path}: no {name} path: the checkpoint has no lumina_illus metadata naming it; "
                    f"pass {name}_path=..."
                )
        device = torch.device(device)
        dtype_name = kwargs.pop("dtype", "fp32" if device.type == "cpu" else "bf16")
        from lumina_illus.models.vae import torch_dtype

        sampler_fields = {f.name for f in dataclasses.fields(FlowSamplerConfig)}
        unknown = set(kwargs) - sampler_fields
        if unknown:
            raise TypeError(f"load_generator: unknown options {sorted(unknown)}; sampler fields: {sorted(sampler_fields)}")
        sampler = dataclasses.replace(model_cfg.sampler, **kwargs)
        if _lora_only(weights):  # a LoRA run's export: its base model with the adapters merged in
            if not model_cfg.pretrained:
                raise ValueError(f"{path}: a LoRA export over a randomly initialised NextDiT (no model.pretrained "
                                 "in its metadata): there is no base model to merge it into")
            gen = self.load_generator(model_cfg.pretrained, device, text_encoder_path=te_cfg.path,
                                      vae_path=vae_cfg.path, dtype=dtype_name, **dataclasses.asdict(sampler))
            linear = [n for n, m in gen.model.named_modules() if isinstance(m, nn.Linear)]
            merge_kohya_file(gen.model, weights / KOHYA_FILE, kohya_names(linear))
            return gen

        dit = load_nextdit(weights, dtype=torch_dtype(dtype_name), device=device).eval()
        dit.requires_grad_(False)
        folder = weights if weights.is_dir() else weights.parent
        if not user_te and (folder / TEXT_ENCODER_DIR / "config.json").is_file():  # the run fine-tuned Gemma
            te_cfg = dataclasses.replace(te_cfg, path=str(folder / TEXT_ENCODER_DIR))
        te = GemmaTextEncoder(te_cfg, device)
        te_file = folder / TEXT_ENCODER_FILE
        if te_file.is_file():  # an export from before the folder: its weights replace the base ones
            from safetensors.torch import load_file

            te.model.load_state_dict(load_file(str(te_file)))
        codec = LatentCodec(vae_cfg, device)
        return LuminaGenerator(dit, te, codec, sampler, patch_size=dit.config.patch_size)

    def detect(self, path: str | Path) -> bool:
        """True for our exports and for NextDiT checkpoints in the original, ComfyUI or diffusers layout;
        reads tensor names only, never the weights."""
        from lumina_illus.models.checkpoint_io import COMFY_FILE, COMFY_PREFIX, DIFFUSERS_DIR, ORIGINAL_FILE

        p = Path(path)
        if read_metadata(p).get("family") == self.name:
            return True
        if p.is_dir():
            for folder in (p, p / DIFFUSERS_DIR, p / "ema", p / "ema" / DIFFUSERS_DIR):
                config = folder / "config.json"
                if config.is_file() and json.loads(config.read_text()).get("_class_name") == "Lumina2Transformer2DModel":
                    return True
            files = [f for f in (p / ORIGINAL_FILE, p / COMFY_FILE, p / "ema" / ORIGINAL_FILE) if f.is_file()]
            if not files:
                return False
            p = files[0]
        if p.suffix != ".safetensors" or not p.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            keys = [k.removeprefix(COMFY_PREFIX) for k in f.keys()]
        # SDXL single files share ComfyUI's prefix: look for NextDiT's own modules
        return any(k.startswith(("cap_embedder.", "time_caption_embed.")) or ".attention.qkv." in k for k in keys)


# ---------------------------------------------------------------------------------------------
# helpers


def build_dit(mc: Lumina2Config, where: str = "<config>") -> NextDiT:
    """Random NextDiT from `arch`, or the `pretrained` checkpoint (whose config must agree with `arch`)."""
    arch = mc.nextdit()
    if mc.pretrained is None:
        return NextDiT(arch)
    if not Path(mc.pretrained).exists():
        raise FileNotFoundError(f"{where}: model.pretrained: {mc.pretrained} does not exist")
    dit = load_nextdit(mc.pretrained, dtype=torch.float32)
    given = {k for k in mc.arch if k != "preset"}
    for k in sorted(given - _RUNTIME_FIELDS):
        if getattr(arch, k) != getattr(dit.config, k):
            raise ConfigError(
                f"{where}: model.arch.{k} = {getattr(arch, k)!r} but {mc.pretrained} has {getattr(dit.config, k)!r}"
            )
    dit.set_attention_backend(arch.attention)
    dit.set_activation_checkpointing(arch.activation_checkpointing)
    return dit


def pad_features(feats: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per-sample text features B x (L_i, D) -> ((B, max L, D) right padded, (B, max L) bool mask)."""
    n = max(f.shape[0] for f in feats)
    out = torch.zeros(len(feats), n, feats[0].shape[1], device=device)  # (B, n, D)
    mask = torch.zeros(len(feats), n, dtype=torch.bool, device=device)  # (B, n)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f.to(device, torch.float32)
        mask[i, : f.shape[0]] = True
    return out, mask


def export_weights(
    state_dict: dict[str, torch.Tensor],
    dit_cfg: NextDiTConfig,
    out_dir: Path,
    metadata: dict[str, Any],
    layouts: list[str],
) -> list[Path]:
    """Training-module state dict -> NextDiT files in every layout (checkpoint_io names) plus, when the
    text encoder trained, `text_encoder/`: a transformers folder (the base encoder's config and tokenizer
    files, the trained weights as model.safetensors) that `AutoModel.from_pretrained` loads as it is.
    Keys must be `dit.*` or `text_encoder.*`."""
    from safetensors.torch import save_file

    from lumina_illus.models.checkpoint_io import export_layouts

    dit_sd, te_sd, other = {}, {}, []
    for k, v in state_dict.items():
        if k.startswith("dit."):
            dit_sd[k[4:]] = v
        elif k.startswith("text_encoder.model."):
            te_sd[k[len("text_encoder.model.") :]] = v
        else:
            other.append(k)
    if other:
        raise ValueError(f"export to {out_dir}: unexpected keys (not dit.* / text_encoder.*): {other[:5]}")
    paths = export_layouts(dit_sd, dit_cfg, out_dir, layouts=layouts, metadata=metadata, dtype=None)
    if te_sd:
        base = Path(metadata["config"]["model"]["text_encoder"]["path"])
        te_dir = out_dir / TEXT_ENCODER_DIR
        te_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(base.iterdir()):  # config, tokenizer, generation config: everything but weights
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
                shutil.copyfile(f, te_dir / f.name)
                paths.append(te_dir / f.name)
        tensors = {k: v.detach().cpu().contiguous() for k, v in te_sd.items()}
        tmp = te_dir / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
        tmp.replace(te_dir / "model.safetensors")
        paths.append(te_dir / "model.safetensors")
    return paths


def kohya_names(modules: list[str]) -> dict[str, str]:
    """NextDiT module name -> kohya LoRA key stem: `lora_unet_` + the original-layout name with dots as
    underscores (sd-scripts' Lumina naming; ComfyUI maps `lora_unet_` + every `diffusion_model.` key)."""
    return {n: "lora_unet_" + n.replace(".", "_") for n in modules}


def _lora_only(path: Path) -> bool:
    """An export folder holding a LoRA and no full NextDiT weights."""
    from lumina_illus.models.checkpoint_io import COMFY_FILE, DIFFUSERS_DIR, ORIGINAL_FILE

    return path.is_dir() and (path / KOHYA_FILE).is_file() and not any(
        (path / f).exists() for f in (ORIGINAL_FILE, COMFY_FILE, DIFFUSERS_DIR))


def _has_weights(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*.safetensors")) or (path / "diffusers").is_dir())


def _model_config_from_metadata(meta: dict[str, Any], path: Path) -> Lumina2Config:
    """The `model:` section stored in an export's metadata; defaults for foreign checkpoints."""
    if not meta:
        return Lumina2Config(arch={})
    if meta.get("family") not in (None, "lumina2"):
        raise ValueError(f"{path}: a {meta['family']!r} checkpoint, not lumina2")
    model = (meta.get("config") or {}).get("model")
    if model is None:
        return Lumina2Config(arch={})
    return from_dict(Lumina2Config, model, where=f"{path} (metadata)", prefix="model.")


FAMILY = Lumina2Family()
