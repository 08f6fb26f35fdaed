"""The one switch between model families.

A family bundles everything that differs between Lumina-2 and SDXL: model constructor and checkpoint
I/O, text conditioning, latent codec, objective and sampler. The trainer, data pipeline, checkpointing,
telemetry and evaluation only talk to the `Family` interface below and never branch on the name.
Adding a family means one new module that defines `FAMILY` and one line in `FAMILY_REGISTRY`
(lumina_illus/config.py, which validates each family's `model:` section without importing this module).

Contract (what the rest of the code relies on):

    fam = get_family(cfg.family)
    parts = fam.build_training(cfg, device)        # TrainingParts
    inputs = parts.prepare(batch, generator)       # frozen no-grad work (VAE, frozen text encoder, t, noise)
    out = engine(**inputs)                         # parts.module under DeepSpeed -> LossOutput
    files = parts.export(full_state_dict, out_dir, metadata)   # consolidated safetensors, every layout
    gen = parts.generator(module)                  # sampler over live weights (sample grids, eval)
    gen = fam.load_generator(path, device)         # sampler over an exported checkpoint (eval, CLI)
    enc = fam.cache_encoders(cfg, text=True)       # the frozen encoders data/cache_latents.py caches with
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from lumina_illus.config import FAMILY_REGISTRY, load_family

if TYPE_CHECKING:
    from PIL import Image

    from lumina_illus.config import RunConfig
    from lumina_illus.data.batch import Batch


# Key of the JSON string stored in every exported safetensors header and in meta.json beside
# exported folders: {"family", "step", "samples_seen", "run", "layout", "weights": "raw"|"ema", "config"}.
METADATA_KEY = "lumina_illus"


@dataclass
class LossOutput:
    """What a family's training module returns for one micro-batch."""

    loss: torch.Tensor  # () scalar to backpropagate
    per_sample: torch.Tensor  # (B,) detached loss of each sample
    t: torch.Tensor  # (B,) noise level in Lumina's convention: 0 = pure noise, 1 = clean data
    extras: dict[str, float] = field(default_factory=dict)  # family-specific scalars to log


@runtime_checkable
class Generator(Protocol):
    """Text-to-image sampling over fixed weights; identical interface for every family."""

    def generate(
        self,
        prompts: list[str],
        sizes: list[tuple[int, int]],  # (width, height) per prompt
        seeds: list[int],  # one per prompt
        steps: int | None = None,  # None: the family's configured default
        guidance: float | None = None,
        negative_prompt: str = "",
        progress: bool = False,
    ) -> list[Image.Image]: ...

    def trajectory(
        self, prompt: str, size: tuple[int, int], seed: int, steps: int, guidance: float
    ) -> list[dict[str, Any]]:
        """One sampling run, step by step: [{"t": float (0 noise .. 1 data), "x": latents (C,h,w),
        "x0": the model's clean-latent prediction (C,h,w)}, ...]; for eval/denoise_fft.py."""
        ...

    def decode(self, latents: torch.Tensor) -> Image.Image: ...  # (C,h,w) latents -> image


@dataclass
class TrainingParts:
    """Everything the trainer needs from a family, built on one device."""

    module: nn.Module  # handed to deepspeed.initialize: owns exactly the trainable parameters
    param_groups: list[dict[str, Any]]  # optimizer groups {"params", "lr", "name"}; trainable only
    # (batch, generator, t=None) -> kwargs of module.forward; t (B,) in Lumina time fixes the noise levels
    prepare: Callable[..., dict[str, Any]]
    flops: Callable[[Batch], float]  # model FLOPs (forward + backward) of this micro-batch, for MFU
    export: Callable[[dict[str, torch.Tensor], Path, dict[str, Any]], list[Path]]
    generator: Callable[[nn.Module], Generator]  # sampler using the given (live or EMA) module weights
    tokens: Callable[[Batch], int] = lambda b: 0  # image tokens in this micro-batch, for tokens/s


# captions -> per caption the tensors a cache stores for it: {"text_embeds": (L, D), ...} (the family's
# own extra fields, e.g. SDXL's "text_pooled" (P,)), real tokens only, in the encoder's dtype
TextFeatures = Callable[[list[str]], list[dict[str, torch.Tensor]]]


@dataclass
class CacheEncoders:
    """What data/cache_latents.py needs from a family: the frozen VAE and (with --text-embeds) text
    features the training path reads back from the cache instead of computing them."""

    settings: dict[str, Any]  # {"vae": ..., "text_encoder": ... or None}: what decides the cached bytes (markers)
    load: Callable[[torch.device], tuple[Any, TextFeatures | None]]  # device -> (LatentCodec, text features)


class Family(Protocol):
    name: str
    size_multiple: int  # generated image sides must be multiples of this (pixels per latent token side)
    config_cls: type  # dataclass validating the run config's `model:` section

    def build_training(self, cfg: RunConfig, device: torch.device) -> TrainingParts: ...

    def load_generator(self, path: str | Path, device: torch.device, **kwargs: Any) -> Generator: ...

    def detect(self, path: str | Path) -> bool: ...  # True if `path` is a checkpoint of this family

    # frozen encoders of `cfg` for data/cache_latents.py (text: with text features); raises ConfigError
    # naming the key when `cfg` cannot be cached
    def cache_encoders(self, cfg: RunConfig, text: bool) -> CacheEncoders: ...


def check_sizes(sizes: Sequence[tuple[int, int]], multiple: int, where: str,
                error: type[Exception] = ValueError) -> None:
    """Every (width, height) a positive multiple of `multiple` (the family's pixels per latent token);
    raises `error` naming `where` (the option or config key) and the sizes that are not."""
    bad = [f"{w}x{h}" for w, h in sizes if w <= 0 or h <= 0 or w % multiple or h % multiple]
    if bad:
        raise error(f"{where}: {', '.join(bad)}: width and height must be positive multiples of {multiple}")


def family_names() -> list[str]:
    return sorted(FAMILY_REGISTRY)


def get_family(name: str) -> Family:
    """The registered family `name` (registry: lumina_illus/config.py FAMILY_REGISTRY); KeyError naming
    the registered ones."""
    return load_family(name)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The lumina_illus metadata of an exported checkpoint (file or folder); {} when it has none."""
    p = Path(path)
    if p.is_dir():
        meta = p / "meta.json"
        if meta.is_file():
            return json.loads(meta.read_text())
        files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*/*.safetensors"))
        p = files[0] if files else p
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else {}
    return {}


def detect_family(path: str | Path) -> Family:
    """The family of a checkpoint: from our metadata when present, else asking each family."""
    meta = read_metadata(path)
    if meta.get("family") in FAMILY_REGISTRY:
        return get_family(meta["family"])
    for name in family_names():
        fam = get_family(name)
        if fam.detect(path):
            return fam
    raise ValueError(f"{path}: not a checkpoint of any registered family ({family_names()})")
