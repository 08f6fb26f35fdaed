"""Discrete-time diffusion objective of the SDXL family: eps or v prediction, scaled-linear betas,
optional zero-terminal-SNR rescale, min-SNR-gamma weighting, low-SNR timestep sampling, noise offset.

    sched = NoiseSchedule.from_config(DiffusionConfig(prediction="v", zero_terminal_snr=True))
    ts = sample_timesteps(cfg, B, generator)                 # (B,) int64 in [0, 1000)
    x_t = sched.add_noise(x0, noise, ts); target = sched.target(cfg.prediction, x0, noise, ts)
    w = sched.min_snr_weights(ts, cfg.prediction, cfg.min_snr_gamma)
    t = sched.lumina_t(ts)                                   # (B,) 0 = noise .. 1 = data (LossOutput.t)

DDPM indexes time the other way round from the rest of this code: timestep 0 is nearly clean and
timestep T-1 the noisiest. `NoiseSchedule.lumina_t` is the one place that converts: it returns the
flow-matching time with the same signal-to-noise ratio, t = a / (a + s) with a = sqrt(alpha_bar),
s = sqrt(1 - alpha_bar), because x_t = t*x1 + (1-t)*x0 has SNR t^2/(1-t)^2 = a^2/s^2. With ZTSNR the
terminal step maps to exactly t = 0. Everything here is a pure function of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lumina_illus.config import check


@dataclass
class DiffusionConfig:
    prediction: Literal["eps", "v"] = "eps"  # network target: noise (SDXL base) or velocity a*eps - s*x0
    num_train_timesteps: int = 1000  # DDPM steps T
    beta_start: float = 0.00085  # scaled-linear schedule: betas = linspace(sqrt(start), sqrt(end), T)^2
    beta_end: float = 0.012
    zero_terminal_snr: bool = False  # Lin et al. 2023 rescale so alpha_bar[T-1] = 0 (pure noise)
    min_snr_gamma: float = 0.0  # Hang et al. 2023 loss weight min(SNR, gamma) on the x0 error; 0 = off
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # how training timesteps are drawn
    # logit_normal: u ~ sigmoid(N(mean, std)), timestep = floor(u*T); mean > 0 weights toward high
    # timesteps = low SNR (the seed's idea for robust v-pred training), mean 0 is symmetric
    logit_mean: float = 0.5
    logit_std: float = 1.0
    noise_offset: float = 0.0  # eps only: noise += offset * N(0,1) per (sample, channel), for dark/bright images

    def __post_init__(self) -> None:
        check(self.num_train_timesteps >= 2, "num_train_timesteps", "must be >= 2")
        check(0 < self.beta_start < self.beta_end < 1, "beta_start", "must satisfy 0 < beta_start < beta_end < 1")
        check(self.min_snr_gamma >= 0, "min_snr_gamma", "must be >= 0 (0 disables min-SNR weighting)")
        check(self.logit_std > 0, "logit_std", "must be > 0")
        check(self.noise_offset >= 0, "noise_offset", "must be >= 0")
        # v-prediction with ZTSNR already trains the all-noise step; an offset would shift its mean
        check(
            self.noise_offset == 0 or self.prediction == "eps",
            "noise_offset",
            "is only supported with prediction 'eps' (use zero_terminal_snr for v-prediction)",
        )


def scaled_linear_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """(T,) float64 betas of SDXL's "scaled_linear" schedule, ZTSNR-rescaled when configured."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero signal
    while the first keeps its value, then convert back to betas."""
    a = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,) sqrt(alpha_bar)
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)  # 1. a[-1] = 0, a[0] unchanged
    alpha_bar = a**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # 2. undo the cumulative product
    return 1.0 - alphas


@dataclass
class NoiseSchedule:
    """alpha_bar of every DDPM timestep; all methods index it with integer timesteps (B,)."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        return cls(torch.cumprod(1.0 - scaled_linear_betas(cfg), dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _coeffs(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of each timestep, shaped (B, 1, ..., 1) to broadcast."""
        ab = self.alphas_cumprod.to(timesteps.device)[timesteps]  # (B,) float64
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = ab.sqrt().to(like.dtype).view(shape)
        s = (1.0 - ab).sqrt().to(like.dtype).view(shape)
        return a, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = a*x0 + s*eps for x0, noise (B, C, h, w)."""
        a, s = self._coeffs(timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = a*eps - s*x0 (Salimans & Ho 2022), the v-prediction target."""
        a, s = self._coeffs(timesteps, x0)
        return a * noise - s * x0

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise if prediction == "eps" else self.velocity(x0, noise, timesteps)

    def predict_x0_eps(
        self, prediction: str, model_out: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a model output at x_t; used by the samplers."""
        a, s = self._coeffs(timesteps, x_t)
        if prediction == "v":
            return a * x_t - s * model_out, s * x_t + a * model_out
        # eps: x0 = (x_t - s*eps)/a, undefined where a = 0 (ZTSNR terminal step); samplers avoid it
        return (x_t - s * model_out) / a, model_out

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) float64 alpha_bar / (1 - alpha_bar); 0 at a ZTSNR terminal step."""
        ab = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return ab / (1.0 - ab)

    def min_snr_weights(self, timesteps: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
        """(B,) float32 per-sample loss weights of Min-SNR-gamma (Hang et al. 2023).

        The paper weights the x0 error by min(SNR, gamma). An eps error equals SNR times the x0 error
        and a v error (SNR + 1) times it, so the weights on our losses are
        eps: min(SNR, gamma) / SNR = min(1, gamma / SNR)  (written this way it stays 1 at SNR = 0),
        v:   min(SNR, gamma) / (SNR + 1).
        gamma = 0 disables weighting (all ones)."""
        if gamma <= 0:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        snr = self.snr(timesteps)
        if prediction == "eps":
            w = torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> clamped to 1
        else:
            w = torch.clamp(snr, max=gamma) / (snr + 1.0)
        return w.float()

    def timesteps_for(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) int64 DDPM timesteps whose lumina_t is nearest each t (Lumina time, 0 = noise)."""
        all_t = self.lumina_t(torch.arange(len(self.alphas_cumprod), device=t.device))  # (T,)
        return (all_t[None, :] - t.float()[:, None]).abs().argmin(dim=1)

    def lumina_t(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) float32 Lumina time (0 = noise, 1 = data) with the same SNR as each DDPM timestep.
        The only conversion between the two time conventions (see the module docstring)."""
        ab = self.alphas_cumprod.to(timesteps.device)[timesteps]
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        return (a / (a + s)).float()


def sample_timesteps(cfg: DiffusionConfig, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 training timesteps in [0, T): uniform, or logit-normal (see DiffusionConfig)."""
    T = cfg.num_train_timesteps
    dev = generator.device if generator is not None else torch.device("cpu")
    if cfg.timestep_sampling == "uniform":
        return torch.randint(0, T, (batch,), generator=generator, device=dev)
    z = torch.randn(batch, generator=generator, device=dev) * cfg.logit_std + cfg.logit_mean  # (B,)
    return (torch.sigmoid(z) * T).long().clamp_(0, T - 1)


def sample_noise(
    cfg: DiffusionConfig, like: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like latents (B, C, h, w), plus the per-channel offset for eps models."""
    # drawn on the generator's device (the trainer's generator may live on the CPU), then moved
    dev = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype)
    if cfg.noise_offset > 0:
        offset = torch.randn(like.shape[0], like.shape[1], 1, 1, generator=generator, device=dev, dtype=like.dtype)
        noise = noise + cfg.noise_offset * offset  # (B, C, h, w)
    return noise.to(like.device)
