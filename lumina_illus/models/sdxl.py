"""The "sdxl" family: SDXL UNet + CLIP-L + OpenCLIP bigG (optionally trained together) + SDXL VAE,
trained with the discrete diffusion objective (eps or v, optional zero-terminal SNR).

    fam = get_family("sdxl")                              # this module's FAMILY
    parts = fam.build_training(cfg, device)               # cfg.model is an SDXLConfig
    gen = fam.load_generator("runs/x/ckpt/step_0001000", device)

Text conditioning follows SDXL: CLIP-L hidden_states[-2] and bigG hidden_states[-2] concatenated on
the feature axis (768 + 1280 = 2048 wide), bigG's projected pooled output plus the six
micro-conditioning numbers (original h, w, crop top, left, target h, w) feed the UNet's add embedding.
Prompts longer than 75 tokens are cut into 75-token chunks, each wrapped in BOS/EOS and padded to 77,
encoded separately and concatenated along the sequence (the A1111 / kohya convention); the pooled
vector comes from the first chunk. A batch pads shorter prompts with empty chunks.

Frozen parts (VAE, and the text encoders when optim.text_encoder_lr is None) live outside the
training module and run under no_grad in `prepare`; trainable text encoders sit in the module next to
the UNet with their own learning rate. A cache (data/cache_latents.py CONFIG OUT --text-embeds, via
`cache_encoders`) replaces the frozen work: latents, and per caption its own chunks' CLIP states plus
bigG's pooled output before text_projection (`SDXLTextConditioner.cache_features`), from which
`cached_conditioning` rebuilds bit for bit (CPU, fp32 cache; tests/test_sdxl_cache.py) the UNet inputs
the live CLIPs give the same batch. Trainable text encoders with such a cache stop at start. With `lora.enabled` the UNet is frozen and only its adapters
(models/lora.py, default targets LORA_TARGETS) train and export, under sd-scripts' key names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lumina_illus.config import ConfigError, ConfigErrorOnEveryRank, check, from_dict, to_dict
from lumina_illus.data.shards import text_feature_cache
from lumina_illus.families import (
    METADATA_KEY,
    CacheEncoders,
    LossOutput,
    TrainingParts,
    check_sizes,
    read_metadata,
)
from lumina_illus.models import sdxl_checkpoint as ckpt_io
from lumina_illus.models.lora import KOHYA_FILE, apply_lora, export_lora, merge_kohya_file
from lumina_illus.models.vae import LatentCodec, VAEConfig, torch_dtype
from lumina_illus.objectives.diffusion import DiffusionConfig, NoiseSchedule, sample_noise, sample_timesteps
from lumina_illus.sampling.diffusion import DiffusionSamplerConfig, SDXLGenerator

if TYPE_CHECKING:
    from lumina_illus.config import RunConfig
    from lumina_illus.data.batch import Batch

SINGLE_FILE_NAME = "sdxl.safetensors"  # community single file inside an export folder
DIFFUSERS_DIR = "diffusers"  # diffusers pipeline folder inside an export folder
CHUNK = 75  # text tokens per CLIP chunk (77 with BOS/EOS)
# LoRA targets when lora.targets is empty: every Linear inside the transformer blocks (proj_in/out,
# attention q/k/v/out, feed-forward), the modules sd-scripts' networks.lora adapts in an SDXL UNet
LORA_TARGETS = ["*attentions.*"]


def _sdxl_vae() -> VAEConfig:
    return VAEConfig(scaling_factor=0.13025, shift_factor=0.0)


@dataclass
class SDXLConfig:
    # diffusers SDXL folder (unet/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ vae/) or a
    # community single-file .safetensors checkpoint to start from
    pretrained: str
    components: str | None = None  # diffusers SDXL folder giving configs + tokenizers when `pretrained` is a single file
    vae: VAEConfig = field(default_factory=_sdxl_vae)  # vae.path None: the VAE of `pretrained`
    objective: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: DiffusionSamplerConfig = field(default_factory=DiffusionSamplerConfig)
    max_text_chunks: int = 3  # prompts are cut after max_text_chunks * 75 tokens
    frozen_dtype: str = "fp32"  # fp32 | bf16 | fp16: dtype of frozen text encoders

    def __post_init__(self) -> None:
        check(self.max_text_chunks >= 1, "max_text_chunks", "must be >= 1")
        check(self.frozen_dtype in ("fp32", "bf16", "fp16"), "frozen_dtype", "must be fp32, bf16 or fp16")


# ---------------------------------------------------------------------------------------------
# components


@dataclass
class SDXLComponents:
    unet: nn.Module | None  # diffusers UNet2DConditionModel; None when loaded without it (caching)
    text_encoder: nn.Module  # transformers CLIPTextModel (ViT-L)
    text_encoder_2: nn.Module  # transformers CLIPTextModelWithProjection (bigG)
    tokenizer: Any
    tokenizer_2: Any
    vae: nn.Module  # diffusers AutoencoderKL
    v_pred: bool = False  # single-file marker found
    ztsnr: bool = False


def _require_folder(root: Path, where: str) -> None:
    need = ["unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]
    missing = [n for n in need if not (root / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"{where}: {root} is not a diffusers SDXL folder (missing {missing})")


def load_components(source: str | Path, components: str | Path | None = None, where: str = "model.pretrained",
                    unet: bool = True) -> SDXLComponents:
    """All SDXL parts from a diffusers folder, or from a single file with configs + tokenizers taken
    from the diffusers folder `components`. unet=False leaves the UNet out (the frozen parts a cache needs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = Path(source)
    folder = Path(components) if components else source
    if source.is_file():
        if components is None:
            raise ValueError(
                f"{where}: {source} is a single file; set model.components to a diffusers SDXL folder "
                "(configs + tokenizers, e.g. stabilityai/stable-diffusion-xl-base-1.0 without weights)"
            )
    elif not source.is_dir():
        raise FileNotFoundError(f"{where}: {source} does not exist")
    _require_folder(folder, "model.components" if source.is_file() else where)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    if source.is_dir():
        return SDXLComponents(
            UNet2DConditionModel.from_pretrained(source / "unet") if unet else None,
            CLIPTextModel.from_pretrained(source / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(source / "text_encoder_2"),
            tok, tok2, AutoencoderKL.from_pretrained(source / "vae"),
        )
    # single file: empty modules from the configs, then the converted weights
    from transformers import CLIPTextConfig

    unet_cfg = UNet2DConditionModel.load_config(folder / "unet")
    vae_cfg = AutoencoderKL.load_config(folder / "vae")
    sf = ckpt_io.read_single_file(source, unet_cfg, vae_cfg)
    models = {
        **({"unet": UNet2DConditionModel.from_config(unet_cfg)} if unet else {}),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        "vae": AutoencoderKL.from_config(vae_cfg),
    }
    for name, m in models.items():
        res = m.load_state_dict(sf.state[name], strict=False)
        missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
        if missing or res.unexpected_keys:
            raise KeyError(f"{source}: {name} weights do not fit {folder / name}: missing {missing[:5]}, "
                           f"unexpected {res.unexpected_keys[:5]}")
    return SDXLComponents(models.get("unet"), models["text_encoder"], models["text_encoder_2"], tok, tok2,
                          models["vae"], sf.v_pred, sf.ztsnr)


# ---------------------------------------------------------------------------------------------
# text conditioning


def chunk_counts(tokenizer: Any, prompts: list[str], max_chunks: int) -> tuple[list[list[int]], list[int]]:
    """(token ids without BOS/EOS, chunks of each prompt in 1..max_chunks) of each prompt."""
    body = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return body, [min(max(1, math.ceil(len(ids) / CHUNK)), max_chunks) for ids in body]


def chunk_token_ids(tokenizer: Any, prompts: list[str], max_chunks: int) -> torch.Tensor:
    """(B, n, 77) int64: each prompt's tokens in 75-token chunks wrapped in BOS ... EOS and padded with
    the tokenizer's pad token; n = chunks of the longest prompt (<= max_chunks), shorter prompts get
    empty chunks ([BOS, EOS, pad...]) so that the batch stacks."""
    body, counts = chunk_counts(tokenizer, prompts, max_chunks)
    n = max(counts)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = torch.full((len(prompts), n, CHUNK + 2), pad, dtype=torch.long)
    for i, ids in enumerate(body):
        for c in range(n):
            piece = ids[c * CHUNK : (c + 1) * CHUNK]
            out[i, c, : len(piece) + 2] = torch.tensor([bos, *piece, eos])
    return out


def clip_states(
    te1: nn.Module, te2: nn.Module, ids1: torch.Tensor, ids2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, n, 77) for each tokenizer -> (prompt embeds (B, n*77, D1+D2), bigG's pooled output of each
    prompt's first chunk before its text_projection (B, D2))."""
    B, n, L = ids1.shape
    h1 = te1(ids1.reshape(B * n, L), output_hidden_states=True).hidden_states[-2]  # (B*n, 77, D1)
    out2 = te2.text_model(ids2.reshape(B * n, L), output_hidden_states=True)  # bigG without its projection
    h2 = out2.hidden_states[-2]  # (B*n, 77, D2)
    embeds = torch.cat([h1, h2], dim=-1).reshape(B, n * L, -1)  # (B, n*77, D1+D2)
    return embeds, out2.pooler_output.reshape(B, n, -1)[:, 0].contiguous()  # (B, D2): EOS state, first chunk


def encode_chunks(
    te1: nn.Module, te2: nn.Module, ids1: torch.Tensor, ids2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, n, 77) for each tokenizer -> (prompt embeds (B, n*77, D1+D2), pooled bigG (B, P))."""
    embeds, pooled = clip_states(te1, te2, ids1, ids2)
    return embeds, te2.text_projection(pooled)  # (B, n*77, D), (B, P)


class SDXLTextConditioner:
    """Tokenizers + the two encoders (live or frozen) -> UNet text conditioning."""

    def __init__(self, te1: nn.Module, te2: nn.Module, tok1: Any, tok2: Any, max_chunks: int) -> None:
        self.te1, self.te2, self.tok1, self.tok2, self.max_chunks = te1, te2, tok1, tok2, max_chunks

    def token_ids(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids1 = chunk_token_ids(self.tok1, prompts, self.max_chunks)
        ids2 = chunk_token_ids(self.tok2, prompts, self.max_chunks)
        return ids1.to(device), ids2.to(device)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.te1.parameters()).device
        with torch.no_grad():
            return encode_chunks(self.te1, self.te2, *self.token_ids(prompts, device))

    def empty_chunk(self) -> torch.Tensor:
        """(77, D1+D2) features of an empty chunk ([BOS, EOS, pad...]): what a batch appends to a prompt
        with fewer chunks than its longest one."""
        return self.encode_prompts([""])[0][0]

    def cache_features(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """What data/cache_latents.py stores per prompt, the smallest thing `cached_conditioning` rebuilds
        the UNet's text inputs from: "text_embeds" (c*77, D1+D2) of the prompt's own c chunks (a batch's
        empty padding chunks are all the same: `empty_chunk`) and "text_pooled" (D2,), bigG's pooled
        output before its text_projection (see cached_conditioning)."""
        device = next(self.te1.parameters()).device
        with torch.no_grad():
            embeds, pooled = clip_states(self.te1, self.te2, *self.token_ids(prompts, device))  # (B, n*77, D), (B, D2)
        counts = chunk_counts(self.tok1, prompts, self.max_chunks)[1]
        return [{"text_embeds": e[: c * (CHUNK + 2)], "text_pooled": p} for e, p, c in zip(embeds, pooled, counts)]


@torch.no_grad()
def cached_conditioning(
    embeds: list[torch.Tensor], pooled: list[torch.Tensor] | None, empty: torch.Tensor, te2: nn.Module,
    max_chunks: int, where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached features per sample (SDXLTextConditioner.cache_features: B x (c_i*77, D), B x (D2,)) -> the
    (prompt embeds (B, n*77, D), pooled (B, P)) that encode_chunks gives the same captions: each prompt
    padded to the batch's n = max c_i chunks with the empty chunk `empty` (77, D), and bigG's
    text_projection applied here, to the batch's B rows as encode_chunks applies it (a CPU matmul picks
    its kernel by the row count: the same vector projected alone or among other rows differs in the last
    bits, ~3e-7). Raises ValueError naming `where` (the batch's keys) when the features are not an SDXL
    cache of this model."""
    L = CHUNK + 2
    if pooled is None:
        raise ValueError(f"{where}: cached text features without 'text_pooled': not an SDXL cache (a Lumina-2 "
                         "Gemma cache?); make one with data/cache_latents.py CONFIG OUT --text-embeds for this SDXL config")
    bad = [tuple(e.shape) for e in embeds if e.ndim != 2 or e.shape[0] % L or not L <= e.shape[0] <= max_chunks * L
           or e.shape[1] != empty.shape[1]]
    if bad:
        raise ValueError(f"{where}: cached text features of shape {bad[:3]}: expected (c*77, {empty.shape[1]}) with "
                         f"1 <= c <= model.max_text_chunks ({max_chunks}); cached with another model or max_text_chunks?")
    proj = te2.text_projection.weight  # (P, D2)
    if any(p.shape != (proj.shape[1],) for p in pooled):
        raise ValueError(f"{where}: cached pooled vectors of shape {sorted({tuple(p.shape) for p in pooled})}: "
                         f"expected ({proj.shape[1]},), bigG's width; cached with another model?")
    n = max(e.shape[0] for e in embeds) // L
    pad = empty.to(proj.device, torch.float32)
    out = torch.stack([torch.cat([e.to(pad.device, torch.float32), *[pad] * (n - e.shape[0] // L)]) for e in embeds])
    first = torch.stack(pooled).to(proj.device, proj.dtype)  # (B, D2)
    return out, te2.text_projection(first)  # (B, n*77, D), (B, P)


def time_ids(batch: Batch, device: torch.device) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w) per sample.
    Missing fields default to the sample's own size and no crop."""
    rows = []
    for i in range(len(batch)):
        x = batch.latents[i] if batch.latents is not None else batch.images[i]
        f = 8 if batch.latents is not None else 1
        own = (x.shape[-2] * f, x.shape[-1] * f)
        orig = batch.original_sizes[i] if i < len(batch.original_sizes) else own
        crop = batch.crops[i] if i < len(batch.crops) else (0, 0)
        target = batch.target_sizes[i] if i < len(batch.target_sizes) else own
        rows.append([*orig, *crop, *target])
    return torch.tensor(rows, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# training module


class SDXLTrainModule(nn.Module):
    """Owns exactly the trainable parameters: the UNet, plus both text encoders when they train."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(
        self,
        noisy: torch.Tensor,  # (B, 4, h, w) x_t
        timesteps: torch.Tensor,  # (B,) int64 DDPM timesteps
        target: torch.Tensor,  # (B, 4, h, w) eps or v
        weights: torch.Tensor,  # (B,) min-SNR loss weights
        time_ids: torch.Tensor,  # (B, 6)
        t: torch.Tensor,  # (B,) Lumina time, for logging
        ids_1: torch.Tensor | None = None,  # (B, n, 77) when the text encoders train
        ids_2: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,  # (B, n*77, D) when they are frozen
        pooled: torch.Tensor | None = None,  # (B, P)
    ) -> LossOutput:
        dtype = next(self.unet.parameters()).dtype  # bf16 under DeepSpeed bf16, inputs follow
        if self.text_encoder is not None:
            prompt_embeds, pooled = encode_chunks(self.text_encoder, self.text_encoder_2, ids_1, ids_2)
        pred = self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
        ).sample
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (weights * per_sample).mean()
        return LossOutput(loss=loss, per_sample=per_sample.detach(), t=t)


# ---------------------------------------------------------------------------------------------
# FLOPs


class UNetFlops:
    """Forward FLOPs of the UNet (and text encoders) measured once per shape with
    torch.utils.flop_counter on a meta-device copy (no memory, no compute), then cached.
    Training FLOPs = 3x forward (backward costs two forwards)."""

    def __init__(self, unet_cfg: dict[str, Any], te_cfgs: list[Any] | None) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        with torch.device("meta"):
            self.unet = UNet2DConditionModel.from_config(unet_cfg)
            self.tes = None
            if te_cfgs is not None:
                self.tes = (CLIPTextModel(te_cfgs[0]), CLIPTextModelWithProjection(te_cfgs[1]))
        self.cache: dict[tuple[int, int, int], float] = {}

    def __call__(self, h: int, w: int, chunks: int) -> float:
        key = (h, w, chunks)
        if key not in self.cache:
            from torch.utils.flop_counter import FlopCounterMode

            c = self.unet.config
            dev = torch.device("meta")
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                self.unet(
                    torch.zeros(1, c.in_channels, h, w, device=dev), torch.zeros(1, device=dev),
                    encoder_hidden_states=torch.zeros(1, 77 * chunks, c.cross_attention_dim, device=dev),
                    added_cond_kwargs={"text_embeds": torch.zeros(1, pooled, device=dev),
                                       "time_ids": torch.zeros(1, 6, device=dev)},
                )
                if self.tes is not None:
                    ids = torch.zeros(chunks, 77, dtype=torch.long, device=dev)
                    for te in self.tes:
                        te(ids, output_hidden_states=True)
            self.cache[key] = 3.0 * fc.get_total_flops()
        return self.cache[key]


# ---------------------------------------------------------------------------------------------
# export


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_diffusers_folder(
    out: Path, state: dict[str, dict[str, torch.Tensor]], comps: SDXLComponents, scheduler: dict[str, Any],
    meta: dict[str, str],
) -> list[Path]:
    """A diffusers StableDiffusionXLPipeline folder: configs from `comps`, weights from `state`."""
    from safetensors.torch import save_file

    from lumina_illus.models.tiny_sdxl import MODEL_INDEX

    files = []
    for name, weights_file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                               ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors")):
        model = getattr(comps, name)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        if name in ("unet", "vae"):
            model.save_config(d)
        else:
            model.config.save_pretrained(d)
        sd = {k: v.contiguous() for k, v in state[name].items()}
        save_file(sd, str(d / weights_file), metadata={"format": "pt", **meta})
        files.append(d / weights_file)
    comps.tokenizer.save_pretrained(out / "tokenizer")
    comps.tokenizer_2.save_pretrained(out / "tokenizer_2")
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(out / "model_index.json", {**MODEL_INDEX, "scheduler": ["diffusers", scheduler["_class_name"]]})
    return files


def scheduler_config(m: SDXLConfig) -> dict[str, Any]:
    """diffusers scheduler config equivalent to our objective + sampler settings."""
    o = m.objective
    return {
        "_class_name": "EulerDiscreteScheduler" if m.sampler.sampler == "euler" else "DDIMScheduler",
        "beta_start": o.beta_start, "beta_end": o.beta_end, "beta_schedule": "scaled_linear",
        "num_train_timesteps": o.num_train_timesteps,
        "prediction_type": "v_prediction" if o.prediction == "v" else "epsilon",
        "rescale_betas_zero_snr": o.zero_terminal_snr, "timestep_spacing": m.sampler.spacing,
        "steps_offset": 1, "set_alpha_to_one": True,
    }


# ---------------------------------------------------------------------------------------------
# the family


def _clip_l_unused(te: nn.Module) -> list[nn.Parameter]:
    """Parameters of CLIP-L after its penultimate hidden state (last encoder layer, final norm)."""
    named = dict(te.named_parameters())
    last = te.config.num_hidden_layers - 1
    return [p for n, p in named.items() if f"encoder.layers.{last}." in n or "final_layer_norm." in n]


def _split_state(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Training-module state dict ("unet.*", "text_encoder.*", ...) -> per-component dicts."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        comp, rest = k.split(".", 1)
        out.setdefault(comp, {})[rest] = v
    return out


class SDXLFamily:
    name = "sdxl"
    size_multiple = 8  # image sides: the SDXL VAE is 8x down
    config_cls = SDXLConfig

    def build_training(self, cfg: RunConfig, device: torch.device) -> TrainingParts:
        m: SDXLConfig = cfg.model
        # the sample grid and in-training recall sizes: refused now, not at the first grid
        check_sizes(cfg.sampling.sizes, self.size_multiple, f"{cfg.source}: sampling.sizes", ConfigError)
        if not isinstance(cfg.train.activation_checkpointing, bool):
            raise ConfigError(f"{cfg.source}: train.activation_checkpointing = {cfg.train.activation_checkpointing!r}: "
                              "the SDXL family checkpoints all blocks or none (false/true, 'off'/'full')")
        train_te = cfg.optim.text_encoder_lr is not None
        cache = text_feature_cache(cfg.data)
        if train_te and cache is not None:
            raise ConfigErrorOnEveryRank(
                f"{cfg.source}: optim.text_encoder_lr is set (the CLIPs train) but data.shards is a cache of frozen "
                f"CLIP features ({cache}): they cannot train the encoders. Remove optim.text_encoder_lr, or train "
                "on image shards or a cache made without --text-embeds")
        comps = load_components(m.pretrained, m.components, where=f"{cfg.source}: model.pretrained")
        # model.vae.path replaces the checkpoint's own VAE (e.g. an fp16-fixed one)
        codec = LatentCodec(m.vae, device, vae=None if m.vae.path else comps.vae)
        comps.vae = codec.vae
        frozen_dtype = torch_dtype(m.frozen_dtype)
        for te in (comps.text_encoder, comps.text_encoder_2):
            te.to(device)
            if not train_te:
                te.to(frozen_dtype).eval().requires_grad_(False)
        comps.unet.to(device).train()
        if cfg.train.activation_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if train_te:
                comps.text_encoder.gradient_checkpointing_enable()
                comps.text_encoder_2.gradient_checkpointing_enable()
        if train_te:
            # SDXL reads CLIP-L's penultimate layer: its last layer and final norm never get a gradient
            unused = _clip_l_unused(comps.text_encoder)
            for p in unused:
                p.requires_grad_(False)
        peft_cfg = None
        if cfg.lora.enabled:
            if train_te:
                raise ConfigError(f"{cfg.source}: lora.enabled with optim.text_encoder_lr set: a LoRA run trains "
                                  "adapters on the UNet only; remove optim.text_encoder_lr")
            if cfg.lora.timestep_sampling is not None:  # in the run config itself, so config.yaml shows it
                m.objective.timestep_sampling = cfg.lora.timestep_sampling
            peft_cfg = apply_lora(comps.unet, cfg.lora, LORA_TARGETS, cfg.source)  # base frozen, adapters trainable
        module = SDXLTrainModule(comps.unet, comps.text_encoder if train_te else None,
                                 comps.text_encoder_2 if train_te else None)
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": cfg.optim.lr,
                   "name": "unet_lora" if peft_cfg is not None else "unet"}]
        if train_te:
            te_params = [p for te in (comps.text_encoder, comps.text_encoder_2) for p in te.parameters() if p.requires_grad]
            groups.append({"params": te_params,
                           "lr": cfg.optim.text_encoder_lr, "name": "text_encoders"})
        text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2,
                                   m.max_text_chunks)
        empty = None if train_te else text.empty_chunk()  # (77, D): pads cached prompts to the batch's chunks
        schedule = NoiseSchedule.from_config(m.objective)
        unet_cfg = dict(comps.unet.config)
        flops = UNetFlops(unet_cfg,
                          [comps.text_encoder.config, comps.text_encoder_2.config] if train_te else None)

        def prepare(batch: Batch, generator: torch.Generator, t: torch.Tensor | None = None) -> dict[str, Any]:
            if batch.latents is not None:
                lat = batch.latents
            elif batch.images is not None:
                lat = codec.encode(batch.images)
            else:
                raise ValueError(f"batch {batch.keys[:3]}: holds neither images nor latents")
            shapes = {tuple(x.shape) for x in lat}
            if len(shapes) > 1:
                raise ValueError(f"sdxl: a micro-batch must hold one size, got {sorted(shapes)}; "
                                 f"set data.batching: bucket in {cfg.source}")
            x0 = torch.stack(lat).to(device, torch.float32)  # (B, 4, h, w)
            if t is None:
                ts = sample_timesteps(m.objective, len(batch), generator).to(device)  # (B,)
            else:  # validation's fixed noise levels, given in Lumina time
                ts = schedule.timesteps_for(t.to(device))  # (B,)
            noise = sample_noise(m.objective, x0, generator)  # (B, 4, h, w)
            out = {
                "noisy": schedule.add_noise(x0, noise, ts),
                "timesteps": ts,
                "target": schedule.target(m.objective.prediction, x0, noise, ts),
                "weights": schedule.min_snr_weights(ts, m.objective.prediction, m.objective.min_snr_gamma),
                "time_ids": time_ids(batch, device),
                "t": schedule.lumina_t(ts),
            }
            if train_te:
                if batch.text_embeds is not None:  # no manifest said so at start: the shards themselves do
                    raise ValueError(f"batch {batch.keys[:3]}: cached CLIP features, but optim.text_encoder_lr in "
                                     f"{cfg.source} trains the CLIPs; remove it or train on image shards")
                out["ids_1"], out["ids_2"] = text.token_ids(batch.captions, device)
            elif batch.text_embeds is not None:  # data/cache_latents.py --text-embeds
                out["prompt_embeds"], out["pooled"] = cached_conditioning(
                    batch.text_embeds, batch.text_pooled, empty, text.te2, m.max_text_chunks, f"batch {batch.keys[:3]}")
            else:
                with torch.no_grad():
                    out["prompt_embeds"], out["pooled"] = text.encode_prompts(batch.captions)
            return out

        def batch_flops(batch: Batch) -> float:
            x = batch.latents[0] if batch.latents is not None else batch.images[0]
            f = 1 if batch.latents is not None else codec.downscale
            chunks = chunk_token_ids(comps.tokenizer, batch.captions, m.max_text_chunks).shape[1]
            return len(batch) * flops(x.shape[-2] // f, x.shape[-1] // f, chunks)

        def tokens(batch: Batch) -> int:
            # image tokens of 16x16 pixels (a 2x2 patch of 8x-down latents), comparable with the DiT
            xs = batch.latents if batch.latents is not None else batch.images
            f = 2 if batch.latents is not None else 16
            return sum((x.shape[-2] // f) * (x.shape[-1] // f) for x in xs)

        def export(sd: dict[str, torch.Tensor], out: Path, metadata: dict[str, Any]) -> list[Path]:
            def full(sd: dict[str, torch.Tensor]) -> list[Path]:
                state = _split_state(sd)
                for name in ("text_encoder", "text_encoder_2"):
                    if name not in state:  # frozen: the loaded weights
                        state[name] = {k: v.detach().cpu() for k, v in getattr(comps, name).state_dict().items()}
                state["vae"] = {k: v.detach().cpu() for k, v in codec.vae.state_dict().items()}
                return export_state(out, state, comps, m, metadata, cfg.checkpoint.export_layouts)

            if peft_cfg is None:
                return full(sd)
            return export_lora(sd, Path(out), metadata, cfg.lora, peft_cfg, prefix="unet.",
                               kohya_names=lambda names: kohya_names(unet_cfg, names), write_full=full)

        def generator(mod: nn.Module) -> SDXLGenerator:
            te1 = mod.text_encoder if mod.text_encoder is not None else comps.text_encoder
            te2 = mod.text_encoder_2 if mod.text_encoder_2 is not None else comps.text_encoder_2
            cond = SDXLTextConditioner(te1, te2, comps.tokenizer, comps.tokenizer_2, m.max_text_chunks)
            return SDXLGenerator(mod.unet, cond, codec, schedule, m.objective.prediction, m.sampler)

        return TrainingParts(module=module, param_groups=groups, prepare=prepare, flops=batch_flops,
                             export=export, generator=generator, tokens=tokens)

    def cache_encoders(self, cfg: RunConfig, text: bool) -> CacheEncoders:
        """The VAE `build_training` encodes with (model.vae.path, else the one in model.pretrained; the
        SDXL scaling 0.13025 from model.vae) and, with `text`, the frozen CLIPs in model.frozen_dtype:
        SDXLTextConditioner.cache_features of each caption."""
        m: SDXLConfig = cfg.model
        settings = {
            "vae": {**to_dict(m.vae), "pretrained": None if m.vae.path else m.pretrained},
            "text_encoder": {"pretrained": m.pretrained, "components": m.components,
                             "max_text_chunks": m.max_text_chunks, "frozen_dtype": m.frozen_dtype} if text else None,
        }

        def load(device: torch.device) -> tuple[LatentCodec, Any]:
            comps = load_components(m.pretrained, m.components, where=f"{cfg.source}: model.pretrained", unet=False)
            codec = LatentCodec(m.vae, device, vae=None if m.vae.path else comps.vae)
            if not text:
                return codec, None
            for te in (comps.text_encoder, comps.text_encoder_2):
                te.to(device).to(torch_dtype(m.frozen_dtype)).eval().requires_grad_(False)
            cond = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2,
                                       m.max_text_chunks)
            return codec, cond.cache_features

        return CacheEncoders(settings, load)

    def load_generator(self, path: str | Path, device: torch.device, **kwargs: Any) -> SDXLGenerator:
        """Sampler over an export folder (ckpt/step_X, its ema/ preferred), a diffusers SDXL folder, or a
        single file. kwargs:
          components: diffusers SDXL folder with the configs + tokenizers a lone single file lacks
            (`text_encoder_path`, the name `lumina_illus.sample --text-encoder` passes, means the same:
            SDXL files hold their text encoders, only tokenizers and configs come from outside);
          vae_path: a diffusers AutoencoderKL folder replacing the checkpoint's VAE;
          sampler: a DiffusionSamplerConfig replacing the checkpoint's."""
        unknown = set(kwargs) - {"components", "text_encoder_path", "vae_path", "sampler"}
        if unknown:
            raise TypeError(f"sdxl load_generator: unknown options {sorted(unknown)}")
        if kwargs.get("text_encoder_path"):
            kwargs["components"] = kwargs.get("components") or kwargs["text_encoder_path"]
        path = Path(path)
        meta = read_metadata(path)  # meta.json of an export folder (the ema/ subfolder has none)
        if path.is_dir() and (path / "ema").is_dir():
            path = path / "ema"
            meta = read_metadata(path) or meta
        lora_file = None
        if path.is_dir() and not ckpt_io.is_sdxl_diffusers_folder(path):
            if (path / DIFFUSERS_DIR / "model_index.json").is_file():
                path = path / DIFFUSERS_DIR
            elif (path / SINGLE_FILE_NAME).is_file():
                path = path / SINGLE_FILE_NAME
            elif (path / KOHYA_FILE).is_file():  # a LoRA run's export: merged into its base model below
                lora_file = path / KOHYA_FILE
            else:
                raise FileNotFoundError(f"{path}: no {DIFFUSERS_DIR}/ folder or {SINGLE_FILE_NAME} of an SDXL export")
        model_cfg = (meta.get("config") or {}).get("model")
        m = from_dict(SDXLConfig, model_cfg, where=f"{path} (metadata)", prefix="model.") if model_cfg else None
        if lora_file is not None:
            if m is None:
                raise ValueError(f"{lora_file}: no lumina_illus metadata naming the base model of this LoRA")
            path = Path(m.pretrained)
        components = kwargs.get("components") or (m.components or m.pretrained if m else None)
        comps = load_components(path, components if path.is_file() else None, where=str(path))
        if lora_file is not None:
            linear = [n for n, mod in comps.unet.named_modules() if isinstance(mod, nn.Linear)]
            merge_kohya_file(comps.unet, lora_file, kohya_names(dict(comps.unet.config), linear))
        if m is None:  # a community checkpoint: markers / scheduler config decide the objective
            m = SDXLConfig(pretrained=str(path), components=components)
            sched = path / "scheduler" / "scheduler_config.json"
            sc = json.loads(sched.read_text()) if sched.is_file() else {}
            v = comps.v_pred or sc.get("prediction_type") == "v_prediction"
            z = comps.ztsnr or bool(sc.get("rescale_betas_zero_snr"))
            m.objective = DiffusionConfig(prediction="v" if v else "eps", zero_terminal_snr=z)
            m.sampler = DiffusionSamplerConfig(spacing="trailing" if z else sc.get("timestep_spacing", "leading"))
        sampler_cfg = kwargs.get("sampler") or m.sampler
        for mod in (comps.unet, comps.text_encoder, comps.text_encoder_2):
            mod.to(device).eval().requires_grad_(False)
        if kwargs.get("vae_path"):
            codec = LatentCodec(replace(m.vae, path=kwargs["vae_path"], subfolder=None), device)
        else:
            codec = LatentCodec(replace(m.vae, path=None), device, vae=comps.vae)  # exports carry their VAE
        text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2,
                                   m.max_text_chunks)
        return SDXLGenerator(comps.unet, text, codec, NoiseSchedule.from_config(m.objective), m.objective.prediction,
                             sampler_cfg)

    def detect(self, path: str | Path) -> bool:
        p = Path(path)
        if p.is_dir():
            return any(ckpt_io.is_sdxl_diffusers_folder(d) or ckpt_io.is_sdxl_single_file(d / SINGLE_FILE_NAME)
                       for d in (p, p / DIFFUSERS_DIR))
        return ckpt_io.is_sdxl_single_file(p)


def kohya_names(unet_cfg: dict[str, Any], modules: list[str]) -> dict[str, str]:
    """diffusers UNet module name -> kohya LoRA key stem: `lora_unet_` + its single-file (sgm) name with
    dots as underscores, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (sd-scripts' SDXL
    naming; ComfyUI maps `lora_unet_` + every `diffusion_model.` key of its SDXL model)."""
    sgm = ckpt_io.unet_key_map(unet_cfg, [n + ".weight" for n in modules])
    return {n: "lora_unet_" + sgm[n + ".weight"].removesuffix(".weight").replace(".", "_") for n in modules}


def export_state(
    out: Path, state: dict[str, dict[str, torch.Tensor]], comps: SDXLComponents, m: SDXLConfig,
    metadata: dict[str, Any], layouts: list[str],
) -> list[Path]:
    """Write the layouts asked for: "original"/"comfy" -> one community single file (both read the same
    file), "diffusers" -> a pipeline folder. Every safetensors header carries our metadata."""
    unknown = sorted(set(layouts) - {"original", "comfy", "diffusers"})
    if unknown:
        raise ValueError(f"checkpoint.export_layouts: unknown layouts {unknown} for sdxl (original, comfy, diffusers)")
    out = Path(out)
    meta = {METADATA_KEY: json.dumps(metadata)}
    files: list[Path] = []
    if {"original", "comfy"} & set(layouts):
        v = m.objective.prediction == "v"
        files.append(ckpt_io.write_single_file(
            out / SINGLE_FILE_NAME, state, dict(comps.unet.config), dict(comps.vae.config),
            v_pred=v, ztsnr=v and m.objective.zero_terminal_snr, metadata=meta,
        ))
    if "diffusers" in layouts:
        files += write_diffusers_folder(out / DIFFUSERS_DIR, state, comps, scheduler_config(m), meta)
    return files


FAMILY = SDXLFamily()
