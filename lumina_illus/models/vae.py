"""Frozen latent codec over a diffusers `AutoencoderKL` (Flux AE for Lumina-2, SDXL VAE for SDXL).

    codec = LatentCodec(VAEConfig(path="/models/flux-ae"), device=torch.device("cuda"))
    latents = codec.encode([img])        # img (3, H, W) in [-1, 1]  ->  (16, H/8, W/8)
    images = codec.decode(latents)       # back to (3, H, W) in [-1, 1]

Latents follow the published normalisation z = (mean - shift) * scale (Flux: shift 0.1159,
scale 0.3611; SDXL: shift 0, scale 0.13025), the same formula diffusers pipelines invert before
decoding. Samples of different sizes are encoded one by one (no padding ever touches the VAE);
large images decode tile by tile to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lumina_illus.config import check


@dataclass
class VAEConfig:
    path: str | None = None  # local diffusers AutoencoderKL folder (config.json + weights); required to build
    subfolder: str | None = None  # e.g. "vae" inside a full diffusers pipeline folder
    scaling_factor: float = 0.3611  # Flux AE; SDXL uses 0.13025
    shift_factor: float = 0.1159  # Flux AE; SDXL uses 0.0
    sample_posterior: bool = False  # encode a posterior sample instead of its mean
    dtype: str = "fp32"  # fp32 | bf16 | fp16: weights and compute dtype (latents are returned as fp32)
    tile_decode_pixels: int = 2048 * 2048  # decode tile by tile when H*W (pixels) exceeds this
    tile_latent: int = 64  # tile side in latent pixels for tiled decode
    tile_overlap: int = 8  # overlap between tiles in latent pixels (blended linearly)

    def __post_init__(self) -> None:
        check(self.scaling_factor > 0, "scaling_factor", "must be > 0")
        check(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}")
        check(self.tile_latent > 2 * self.tile_overlap >= 0, "tile_latent", "must exceed 2 * tile_overlap")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype (shared by the frozen components' configs)."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class LatentCodec(nn.Module):
    """Frozen VAE: images <-> normalised latents. Never trains, never enters an optimizer."""

    def __init__(self, cfg: VAEConfig, device: torch.device | str = "cpu", vae: nn.Module | None = None) -> None:
        """`vae`: an already built autoencoder to wrap; default: load cfg.path. Either runs in cfg.dtype."""
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        if vae is None:
            vae = load_autoencoder(cfg)  # loaded in cfg.dtype
        elif next(vae.parameters()).dtype != dtype:
            vae = vae.to(dtype)
        self.vae = vae.to(device=device)
        self.vae.eval().requires_grad_(False)
        # 2 ** (number of down blocks - 1): 8 for both Flux and SDXL
        self.downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def train(self, mode: bool = True) -> LatentCodec:  # frozen: stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """images: list of (3, H, W) in [-1, 1] with H, W multiples of the downscale -> list of (C, H/8, W/8)."""
        out = []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"LatentCodec.encode: image {i} must be (3, H, W), got {tuple(img.shape)}")
            if img.shape[1] % self.downscale or img.shape[2] % self.downscale:
                raise ValueError(
                    f"LatentCodec.encode: image {i} size {tuple(img.shape[1:])} is not a multiple of {self.downscale}"
                )
            x = img.to(self.device, torch_dtype(self.cfg.dtype))[None]  # (1, 3, H, W)
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator) if self.cfg.sample_posterior else dist.mean  # (1, C, h, w)
            out.append(((z.float() - self.cfg.shift_factor) * self.cfg.scaling_factor)[0])
        return out

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """latents: list of (C, h, w) normalised latents -> list of (3, 8h, 8w) float32 images in [-1, 1]."""
        out = []
        for z in latents:
            z = z.to(self.device, torch.float32)[None] / self.cfg.scaling_factor + self.cfg.shift_factor  # (1, C, h, w)
            z = z.to(torch_dtype(self.cfg.dtype))
            pixels = z.shape[-2] * z.shape[-1] * self.downscale**2
            img = self._decode_tiled(z) if pixels > self.cfg.tile_decode_pixels else self.vae.decode(z).sample
            out.append(img[0].float().clamp(-1, 1))  # (3, H, W)
        return out

    def _decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (1, C, h, w) latents in overlapping tiles, blending overlaps with linear ramps so seams
        do not show; memory grows with the tile, not the image."""
        _, _, h, w = z.shape
        s, ov, f = self.cfg.tile_latent, self.cfg.tile_overlap, self.downscale
        out = torch.zeros(1, 3, h * f, w * f, device=z.device)  # (1, 3, H, W) weighted sum
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)  # (1, 1, H, W) sum of blend weights
        step = s - ov
        tops = list(range(0, max(h - ov, 1), step))
        lefts = list(range(0, max(w - ov, 1), step))
        for top in tops:
            for left in lefts:
                t0, l0 = min(top, max(h - s, 0)), min(left, max(w - s, 0))
                tile = z[:, :, t0 : t0 + s, l0 : l0 + s]  # (1, C, <=s, <=s)
                img = self.vae.decode(tile).sample.float()  # (1, 3, th*f, tw*f)
                th, tw = img.shape[-2:]
                ramp_h = _ramp(th, ov * f, t0 > 0, t0 + s < h, z.device)  # (th,)
                ramp_w = _ramp(tw, ov * f, l0 > 0, l0 + s < w, z.device)  # (tw,)
                wgt = ramp_h[:, None] * ramp_w[None, :]  # (th, tw)
                out[:, :, t0 * f : t0 * f + th, l0 * f : l0 * f + tw] += img * wgt
                weight[:, :, t0 * f : t0 * f + th, l0 * f : l0 * f + tw] += wgt
        return out / weight


def _ramp(n: int, overlap: int, fade_in: bool, fade_out: bool, device: torch.device) -> torch.Tensor:
    """Blend weights of one tile axis: linear ramps over `overlap` pixels at inner edges, 1 elsewhere."""
    r = torch.ones(n, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device) + 0.5) / overlap  # (overlap,) in (0, 1)
        if fade_in:
            r[:overlap] = ramp
        if fade_out:
            r[-overlap:] = ramp.flip(0)
    return r


def load_autoencoder(cfg: VAEConfig) -> nn.Module:
    """The diffusers AutoencoderKL at `cfg.path`, with a clear error when the path is wrong."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    if not cfg.path:
        raise ValueError("vae.path: no VAE path configured (a local diffusers AutoencoderKL folder)")
    root = Path(cfg.path) / (cfg.subfolder or "")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"vae.path: {root} has no config.json (expected a diffusers AutoencoderKL folder)")
    return AutoencoderKL.from_pretrained(cfg.path, subfolder=cfg.subfolder, torch_dtype=torch_dtype(cfg.dtype))
