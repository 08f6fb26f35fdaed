"""Flow-ODE samplers of Lumina-2 (Euler, midpoint) with time shift and Lumina's CFG renorm/truncation.

    sampler = FlowSampler(FlowSamplerConfig(steps=30, shift=6.0, guidance=4.0))
    x1 = sampler.sample(velocity, noise)      # velocity(x: list[(C,h,w)], t: (B,)) -> list[(C,h,w)]

Time runs from t=0 (noise) to t=1 (data) over `steps` intervals of a uniform grid warped by
t' = t / (t + s (1 - t)) (the shift s spends more steps near noise; s=6 is Lumina's default). In
diffusers' terms this is `FlowMatchEulerDiscreteScheduler(shift=s)` over sigmas
linspace(1, 1/steps, steps): the Euler solver reproduces `Lumina2Pipeline` step by step.

Guidance follows the official Lumina-2 code (`forward_with_cfg`): v = v_u + g (v_c - v_u), then, with
renorm_cfg > 0, v is scaled down when its norm over the whole sample exceeds renorm_cfg * |v_c|;
CFG is applied only while t < cfg_trunc (truncation: later steps use v_c alone, saving compute).
diffusers' `cfg_normalization` differs (it rescales every row of the width axis to |v_c|), so parity
checks with diffusers run without normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from lumina_illus.config import check
from lumina_illus.objectives.flow_matching import time_shift

if TYPE_CHECKING:
    from PIL import Image

    from lumina_illus.models.text_encoder import GemmaTextEncoder
    from lumina_illus.models.vae import LatentCodec

Velocity = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]


@dataclass
class FlowSamplerConfig:
    solver: Literal["euler", "midpoint"] = "euler"  # midpoint: 2 model calls per step, 2nd-order accurate
    steps: int = 30  # ODE steps (default of the published pipeline)
    shift: float = 6.0  # time shift factor s of the sampling grid (Lumina-2 default)
    guidance: float = 4.0  # CFG scale g; <= 1 disables CFG (one model call per evaluation)
    cfg_trunc: float = 1.0  # apply CFG only while t < cfg_trunc (Lumina time); 1.0: at every step
    renorm_cfg: float = 1.0  # cap |v_guided| at renorm_cfg * |v_cond| per sample; 0 disables
    negative_prompt: str = ""  # unconditional caption (encoded with the system prompt like any caption)
    batch_size: int = 8  # prompts sampled together (x2 model batch with CFG)

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.shift > 0, "shift", "must be > 0")
        check(0.0 <= self.cfg_trunc <= 1.0, "cfg_trunc", "must be in [0, 1]")
        check(self.renorm_cfg >= 0, "renorm_cfg", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


def sampling_times(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float64 times from 0 (noise) to 1 (data) on the shifted uniform grid."""
    return time_shift(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)


def guided_velocity(
    v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float, renorm_cfg: float
) -> torch.Tensor:
    """CFG of one sample (C, h, w) with Lumina's renormalisation (norm over the whole sample)."""
    v = v_uncond + guidance * (v_cond - v_uncond)
    if renorm_cfg > 0:
        max_norm = renorm_cfg * torch.linalg.vector_norm(v_cond)
        norm = torch.linalg.vector_norm(v)
        if norm >= max_norm:
            v = v * (max_norm / norm)
    return v


class FlowSampler:
    """Integrates dx/dt = v(x, t) from noise (t=0) to data (t=1)."""

    def __init__(self, cfg: FlowSamplerConfig | None = None) -> None:
        self.cfg = cfg or FlowSamplerConfig()

    @torch.no_grad()
    def sample(
        self,
        velocity: Velocity,
        noise: list[torch.Tensor],
        steps: int | None = None,
        progress: bool = False,
        callback: Callable[[int, float, list[torch.Tensor], list[torch.Tensor]], None] | None = None,
    ) -> list[torch.Tensor]:
        """noise: B x (C, h, w) -> B x (C, h, w) samples at t=1 (float32).
        callback(step, t, x, v) sees the state and velocity used at each step (for trajectories)."""
        steps = steps or self.cfg.steps
        ts = sampling_times(steps, self.cfg.shift)  # (steps+1,)
        x = [n.float() for n in noise]
        b = len(x)
        for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            t, t_next = float(ts[i]), float(ts[i + 1])
            h = t_next - t
            v = velocity(x, torch.full((b,), t))  # 1. velocity at the current point
            if callback is not None:
                callback(i, t, x, v)
            if self.cfg.solver == "midpoint":
                # 2. half an Euler step, 3. velocity there, 4. full step with the midpoint velocity
                x_mid = [xi + 0.5 * h * vi.float() for xi, vi in zip(x, v)]
                v = velocity(x_mid, torch.full((b,), t + 0.5 * h))
            x = [xi + h * vi.float() for xi, vi in zip(x, v)]
        return x


class LuminaGenerator:
    """families.Generator over a NextDiT, a Gemma text encoder and a latent codec (live or loaded weights).

    Prompts of different sizes are sampled together through the packed model; with CFG the conditional
    and unconditional halves go through one packed forward. Initial noise is drawn on the CPU from
    `seed`, so a (prompt, size, seed) gives the same image on any device and in any batch."""

    def __init__(
        self,
        model: torch.nn.Module,  # NextDiT: model(latents list, t, cap_feats, cap_mask) -> velocities list
        text_encoder: GemmaTextEncoder,  # anything with .encode(captions) -> (feats, mask)
        codec: LatentCodec,
        sampler_cfg: FlowSamplerConfig | None = None,
        patch_size: int = 2,
    ) -> None:
        self.model = model
        self.text_encoder = text_encoder
        self.codec = codec
        self.cfg = sampler_cfg or FlowSamplerConfig()
        self.sampler = FlowSampler(self.cfg)
        self.multiple = codec.downscale * patch_size  # image sides must be multiples of this (16)

    # -- building blocks -------------------------------------------------------------------------

    def initial_noise(self, size: tuple[int, int], seed: int) -> torch.Tensor:
        """(C, H/8, W/8) standard normal noise for an image of size (width, height), from `seed` on the CPU."""
        w, h = size
        if w % self.multiple or h % self.multiple or w <= 0 or h <= 0:
            raise ValueError(f"image size {w}x{h}: width and height must be positive multiples of {self.multiple}")
        g = torch.Generator().manual_seed(int(seed))
        f = self.codec.downscale
        return torch.randn(self.codec.latent_channels, h // f, w // f, generator=g)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    def _velocity_fn(self, feats: torch.Tensor, mask: torch.Tensor) -> Velocity:
        """Velocity of the model for fixed caption features (B, L, D) and mask (B, L)."""
        device, dtype = self._device_dtype()

        def velocity(x: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
            xs = [xi.to(device, dtype) for xi in x]
            out = self.model(xs, t.to(device), feats.to(device, dtype), mask.to(device))  # t stays fp32
            return [o.float() for o in out]

        return velocity

    def _guided(self, prompts: list[str], negative_prompt: str, guidance: float) -> Velocity:
        """Guided velocity for `prompts`: one packed forward holds the conditional and unconditional halves."""
        with torch.no_grad():
            feats, mask = self.text_encoder.encode(list(prompts))  # (B, L, D), (B, L)
        cond = self._velocity_fn(feats, mask)
        if guidance <= 1.0:
            return cond
        with torch.no_grad():
            nfeats, nmask = self.text_encoder.encode([negative_prompt] * len(prompts))  # (B, L', D)
        both_feats, both_mask = _cat_padded([feats, nfeats], [mask, nmask])  # (2B, max L, D), (2B, max L)
        joint = self._velocity_fn(both_feats, both_mask)
        b = len(prompts)
        cfg = self.cfg

        def velocity(x: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
            if float(t[0]) >= cfg.cfg_trunc:  # truncated: conditional branch only
                return cond(x, t)
            v = joint(x + x, torch.cat([t, t]))  # 2B velocities: [cond ; uncond]
            return [guided_velocity(c, u, guidance, cfg.renorm_cfg) for c, u in zip(v[:b], v[b:])]

        return velocity

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: list[str],
        noise: list[torch.Tensor],
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        progress: bool = False,
        callback: Callable[[int, float, list[torch.Tensor], list[torch.Tensor]], None] | None = None,
    ) -> list[torch.Tensor]:
        """Sample clean latents B x (C, h, w) for `prompts` from the given initial noise."""
        guidance = self.cfg.guidance if guidance is None else guidance
        neg = self.cfg.negative_prompt if negative_prompt is None else negative_prompt
        velocity = self._guided(prompts, neg, guidance)
        return self.sampler.sample(velocity, noise, steps, progress=progress, callback=callback)

    # -- families.Generator ------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        sizes: list[tuple[int, int]],
        seeds: list[int],
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str = "",
        progress: bool = False,
    ) -> list[Image.Image]:
        """One image per (prompt, (width, height), seed), in batches of sampler.batch_size."""
        if not (len(prompts) == len(sizes) == len(seeds)):
            raise ValueError(f"generate: {len(prompts)} prompts, {len(sizes)} sizes, {len(seeds)} seeds")
        images = []
        bs = self.cfg.batch_size
        for start in tqdm(range(0, len(prompts), bs), desc="generate", disable=not progress or len(prompts) <= bs):
            sl = slice(start, start + bs)
            noise = [self.initial_noise(s, k) for s, k in zip(sizes[sl], seeds[sl])]
            lat = self.sample_latents(prompts[sl], noise, steps, guidance, negative_prompt or None, progress=progress)
            images += [to_pil(img) for img in self.codec.decode(lat)]
        return images

    def trajectory(
        self, prompt: str, size: tuple[int, int], seed: int, steps: int, guidance: float
    ) -> list[dict[str, Any]]:
        """[{"t", "x": (C,h,w) state, "x0": (C,h,w) predicted clean latents}] per step, then the final state."""
        out: list[dict[str, Any]] = []

        def record(i: int, t: float, x: list[torch.Tensor], v: list[torch.Tensor]) -> None:
            # x_t = t x1 + (1 - t) x0 and v = x1 - x0  =>  x1 = x_t + (1 - t) v
            out.append({"t": t, "x": x[0].cpu(), "x0": (x[0] + (1 - t) * v[0]).cpu()})

        final = self.sample_latents([prompt], [self.initial_noise(size, seed)], steps, guidance, callback=record)
        out.append({"t": 1.0, "x": final[0].cpu(), "x0": final[0].cpu()})
        return out

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """(C, h, w) latents -> PIL image."""
        return to_pil(self.codec.decode([latents])[0])


def _cat_padded(feats: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate right-padded caption batches of different lengths along the batch axis."""
    n = max(f.shape[1] for f in feats)
    f = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1])) for x in feats])  # (sum B, n, D)
    m = torch.cat([torch.nn.functional.pad(x, (0, n - x.shape[1])) for x in masks])  # (sum B, n)
    return f, m.bool()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    from PIL import Image

    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")
