"""DDPM-family samplers of the SDXL family (Euler, DDIM), CFG with guidance rescale, and `SDXLGenerator`.

    sampler = DiffusionSampler(schedule, prediction="v", cfg=DiffusionSamplerConfig(sampler="euler", spacing="trailing"))
    x0 = sampler.sample(model_fn, noise)      # model_fn(x_in (B,C,h,w), timesteps (B,)) -> model output

Both samplers are deterministic first-order solvers of the probability-flow ODE; they differ only in
their state, exactly as diffusers' schedulers do:
- "euler" (EulerDiscreteScheduler): state x~ = x / sqrt(alpha_bar) on the sigma grid
  sigma = sqrt((1 - alpha_bar) / alpha_bar) of the chosen timesteps, then sigma = 0. Under ZTSNR the
  terminal sigma is infinite, so its alpha_bar is clamped to 2**-24 as diffusers does.
- "ddim" (DDIMScheduler, eta = 0): state x in VP space, x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps,
  ending at alpha_bar = 1. v-prediction handles alpha_bar = 0 exactly (x0 = -v there).
Timestep spacing "leading" (SDXL default, steps_offset 1) or "trailing" (Lin et al. 2023: starts at
T-1, the zero-SNR step, which ZTSNR models need). Guidance rescale (Lin et al. 2023, Sec. 3.4) is
applied to the guided model output like diffusers' `rescale_noise_cfg`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from lumina_illus.config import check
from lumina_illus.objectives.diffusion import NoiseSchedule
from lumina_illus.sampling.flow import to_pil

if TYPE_CHECKING:
    from PIL import Image

    from lumina_illus.models.vae import LatentCodec

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TextConditioner(Protocol):
    """What the sampler needs of SDXL's two CLIPs (models/sdxl.py SDXLTextConditioner): prompts ->
    ((n, L, D) chunked hidden states, (n, P) pooled)."""

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class DiffusionSamplerConfig:
    sampler: Literal["euler", "ddim"] = "euler"  # SDXL's default scheduler is Euler; the seed analyses DDIM
    spacing: Literal["leading", "trailing"] = "leading"  # "trailing" for zero-terminal-SNR models
    steps: int = 28  # model evaluations per image (x2 batch with CFG)
    guidance: float = 7.0  # CFG scale; <= 1 disables CFG
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023; 0.7 is their value for ZTSNR v-pred models
    negative_prompt: str = ""  # default unconditional prompt
    batch_size: int = 4  # prompts sampled together

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(0.0 <= self.guidance_rescale <= 1.0, "guidance_rescale", "must be in [0, 1]")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


def sampling_timesteps(steps: int, num_train_timesteps: int, spacing: str) -> torch.Tensor:
    """(steps,) int64 DDPM timesteps, noisiest first, as diffusers computes them."""
    T = num_train_timesteps
    check(steps <= T, "steps", f"must be <= num_train_timesteps ({T})")
    if spacing == "leading":  # (arange(steps) * (T // steps))[::-1] + steps_offset (1 for SDXL)
        ts = (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps) + 1).clamp(max=T - 1)
    else:  # trailing: round(arange(T, 0, -T / steps)) - 1, starts at T - 1
        ts = torch.arange(T, 0, -T / steps, dtype=torch.float64).round()[:steps] - 1
    return ts.long()


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 eq. 15-16: match the std of the guided output to the conditional one per sample,
    then blend with weight phi. guided, cond: (B, C, h, w)."""
    if phi <= 0:
        return guided
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    std_guided = guided.std(dim=dims, keepdim=True)
    return phi * guided * (std_cond / std_guided) + (1 - phi) * guided


class DiffusionSampler:
    """Integrates from pure noise to x0 with the configured solver; returns latents (B, C, h, w)."""

    def __init__(self, schedule: NoiseSchedule, prediction: str, cfg: DiffusionSamplerConfig) -> None:
        self.schedule, self.prediction, self.cfg = schedule, prediction, cfg
        ab = schedule.alphas_cumprod.clone()
        if ab[-1] == 0 and (cfg.sampler == "euler" or prediction == "eps"):
            # sigma = inf (Euler) or x0 = x/0 (eps) at a zero-SNR step: diffusers' finite stand-in
            ab[-1] = 2.0**-24
        self.alphas_cumprod = ab  # (T,) float64

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        return sampling_timesteps(steps or self.cfg.steps, self.schedule.num_train_timesteps, self.cfg.spacing)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, ab: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model output at VP state x with alpha_bar = ab (float64 math, fp32 result)."""
        a, s = ab**0.5, (1.0 - ab) ** 0.5
        if self.prediction == "v":
            return a * x - s * out, s * x + a * out
        return (x - s * out) / a, out

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, noise: torch.Tensor, steps: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
    ) -> torch.Tensor:
        """noise (B, C, h, w) -> x0. callback receives {"t" (Lumina time of the step), "x" (VP state
        before the step), "x0" (model's clean prediction)} at every step."""
        ts = self.timesteps(steps)
        abs_ = self.alphas_cumprod[ts].tolist()
        lumina_t = self.schedule.lumina_t(ts).tolist()
        B = noise.shape[0]
        x = noise.float()  # VP state: x_T = noise (alpha_bar of the first step is ~0)
        if self.cfg.sampler == "euler":
            sig = [((1 - ab) / ab) ** 0.5 for ab in abs_] + [0.0]
            x = x * (sig[0] ** 2 + 1) ** 0.5  # 0. Euler state x~ = x / sqrt(alpha_bar)
        for i in tqdm(range(len(ts)), disable=not progress, desc="sampling", leave=False):
            t_b = ts[i].expand(B).to(noise.device)  # (B,)
            if self.cfg.sampler == "euler":
                c_in = 1.0 / (sig[i] ** 2 + 1) ** 0.5
                x_vp = x * c_in  # 1. back to VP space for the model
                x0, eps = self._x0_eps(model_fn(x_vp, t_b).float(), x_vp, abs_[i])
                x = x0 + sig[i + 1] * eps  # 2. Euler step x~ + (sigma' - sigma) * (x~ - x0) / sigma
            else:
                x_vp = x
                x0, eps = self._x0_eps(model_fn(x_vp, t_b).float(), x_vp, abs_[i])
                ab_prev = abs_[i + 1] if i + 1 < len(ts) else 1.0
                x = ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps  # DDIM, eta = 0
            if callback is not None:
                callback({"t": lumina_t[i], "x": x_vp, "x0": x0})
        return x


class SDXLGenerator:
    """Text-to-image over fixed weights (families.Generator): UNet + text conditioner + VAE + sampler."""

    def __init__(
        self, unet: torch.nn.Module, text: TextConditioner, codec: LatentCodec, schedule: NoiseSchedule,
        prediction: str, cfg: DiffusionSamplerConfig,
    ) -> None:
        self.unet, self.text, self.codec, self.cfg = unet, text, codec, cfg
        self.sampler = DiffusionSampler(schedule, prediction, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _model_fn(self, prompts: list[str], negative: str, size: tuple[int, int], guidance: float) -> ModelFn:
        """CFG-guided model output for a group of same-size prompts; size is (width, height)."""
        use_cfg = guidance > 1.0
        texts = ([negative] * len(prompts) if use_cfg else []) + list(prompts)
        embeds, pooled = self.text.encode_prompts(texts)  # (n, L, D), (n, P)
        w, h = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(len(texts), 6)
        dtype = next(self.unet.parameters()).dtype

        def fn(x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            xin = torch.cat([x, x]) if use_cfg else x  # (n, C, h, w)
            tin = torch.cat([ts, ts]) if use_cfg else ts
            out = self.unet(
                xin.to(dtype), tin, encoder_hidden_states=embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
            ).sample.float()
            if not use_cfg:
                return out
            uncond, cond = out.chunk(2)
            return rescale_guidance(uncond + guidance * (cond - uncond), cond, self.cfg.guidance_rescale)

        return fn

    def _noise(self, seed: int, size: tuple[int, int]) -> torch.Tensor:
        w, h = size
        f = self.codec.downscale
        if w % f or h % f:
            raise ValueError(f"sample size {size}: width and height must be multiples of {f}")
        g = torch.Generator().manual_seed(seed)  # CPU generator: same image on every device
        return torch.randn(1, self.codec.latent_channels, h // f, w // f, generator=g).to(self.device)  # (1, C, h, w)

    @torch.no_grad()
    def generate(
        self, prompts: list[str], sizes: list[tuple[int, int]], seeds: list[int], steps: int | None = None,
        guidance: float | None = None, negative_prompt: str | None = None, progress: bool = False,
    ) -> list[Image.Image]:
        if not (len(prompts) == len(sizes) == len(seeds)):
            raise ValueError(f"generate: {len(prompts)} prompts, {len(sizes)} sizes, {len(seeds)} seeds must match")
        g = self.cfg.guidance if guidance is None else guidance
        neg = self.cfg.negative_prompt if negative_prompt is None else negative_prompt
        out: list[Any] = [None] * len(prompts)
        # group same-size prompts into batches (any bucket size is fine, one size per UNet call)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            by_size.setdefault(tuple(s), []).append(i)
        groups = [(s, idx[k : k + self.cfg.batch_size]) for s, idx in by_size.items()
                  for k in range(0, len(idx), self.cfg.batch_size)]
        for size, idx in tqdm(groups, disable=not progress, desc="generate"):
            noise = torch.cat([self._noise(seeds[i], size) for i in idx])  # (b, C, h, w)
            x0 = self.sampler.sample(self._model_fn([prompts[i] for i in idx], neg, size, g), noise, steps)
            for i, z in zip(idx, x0):
                out[i] = self.decode(z)
        return out

    @torch.no_grad()
    def trajectory(self, prompt: str, size: tuple[int, int], seed: int, steps: int, guidance: float) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []

        def keep(r: dict[str, Any]) -> None:
            records.append({"t": r["t"], "x": r["x"][0].cpu(), "x0": r["x0"][0].cpu()})

        noise = self._noise(seed, size)
        self.sampler.sample(self._model_fn([prompt], self.cfg.negative_prompt, size, guidance), noise, steps, keep)
        return records

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        return to_pil(self.codec.decode([latents])[0])  # (3, H, W) in [-1, 1]
