"""Rectified-flow objective of Lumina-2, over packed batches of samples of different sizes.

Time convention (the one used everywhere in this code base): t = 0 is pure noise, t = 1 is data.

    x_t = t * x1 + (1 - t) * x0        x1 = clean latents, x0 ~ N(0, I)
    target velocity v = x1 - x0        (what NextDiT predicts)

Timesteps: t ~ uniform or logit-normal, then a time shift that spends more steps near noise for
bigger images. With sigma = 1 - t and shift factor s, the shift is sigma' = s*sigma / (1 + (s-1)*sigma),
i.e. t' = t / (t + s*(1 - t)) (SD3 / Flux / Lumina). "resolution" picks s = exp(mu) per sample, with mu
linear in the sample's image tokens (256 -> 0.5, 4096 -> 1.15), so a packed batch mixing 512^2 and
1024^2 images shifts each sample by its own size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lumina_illus.config import check


@dataclass
class FlowMatchingConfig:
    timestep: Literal["uniform", "logit_normal"] = "logit_normal"  # distribution of t before the shift
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(mean + std * n); mean > 0 favours data, < 0 noise
    logit_std: float = 1.0
    shift: str | float = "resolution"  # "resolution" (per-sample, from image tokens) | "none" | fixed factor s
    base_tokens: int = 256  # resolution shift: image tokens where mu = base_mu
    max_tokens: int = 4096  # image tokens where mu = max_mu (extrapolated linearly beyond)
    base_mu: float = 0.5
    max_mu: float = 1.15
    reduction: Literal["sample", "token"] = "sample"  # mean per sample then over samples | every token equal
    t_bins: int = 10  # loss is also reported per bin of t, for logging

    def __post_init__(self) -> None:
        if isinstance(self.shift, str):
            check(self.shift in ("resolution", "none"), "shift", "must be 'resolution', 'none' or a number > 0")
        else:
            check(self.shift > 0, "shift", "must be 'resolution', 'none' or a number > 0")
        check(self.logit_std > 0, "logit_std", "must be > 0")
        check(0 < self.base_tokens < self.max_tokens, "base_tokens", "must be > 0 and < max_tokens")
        check(self.t_bins >= 1, "t_bins", "must be >= 1")


def time_shift(t: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Shift Lumina times toward noise by factor `shift` (s=1: identity): t' = t / (t + s (1 - t))."""
    return t / (t + shift * (1.0 - t))


def resolution_mu(image_tokens: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """mu linear in image tokens through (base_tokens, base_mu) and (max_tokens, max_mu)."""
    slope = (cfg.max_mu - cfg.base_mu) / (cfg.max_tokens - cfg.base_tokens)
    return cfg.base_mu + slope * (image_tokens.float() - cfg.base_tokens)


def shift_factor(image_tokens: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """(B,) shift factor s of each sample under `cfg.shift`."""
    if cfg.shift == "resolution":
        return torch.exp(resolution_mu(image_tokens, cfg))
    if cfg.shift == "none":
        return torch.ones_like(image_tokens, dtype=torch.float32)
    return torch.full_like(image_tokens, float(cfg.shift), dtype=torch.float32)


class FlowMatching:
    """Sampling of (t, noise), noisy inputs, targets and the packed-batch loss."""

    def __init__(self, cfg: FlowMatchingConfig | None = None) -> None:
        self.cfg = cfg or FlowMatchingConfig()

    def sample_t(
        self, image_tokens: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B,) float32 times, one per sample, on the generator's device; `image_tokens` gives each
        sample's token count (for the resolution shift)."""
        device = generator.device if generator is not None else torch.device("cpu")
        tokens = torch.as_tensor(image_tokens, dtype=torch.float32, device=device)  # (B,)
        n = tokens.shape[0]
        if self.cfg.timestep == "uniform":
            t = torch.rand(n, generator=generator, device=device)  # (B,)
        else:
            z = torch.randn(n, generator=generator, device=device)  # (B,)
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return time_shift(t, shift_factor(tokens, self.cfg))

    @staticmethod
    def sample_noise(latents: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """x0 ~ N(0, I) shaped like each latent, drawn on the generator's device (reproducible per seed)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return [
            torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype) for x in latents
        ]

    @staticmethod
    def noisy_input(x1: list[torch.Tensor], x0: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        """x_t = t * x1 + (1 - t) * x0 per sample; t: (B,)."""
        return [ti * a + (1 - ti) * b for a, b, ti in zip(x1, x0, t.to(x1[0].device, x1[0].dtype))]

    @staticmethod
    def target(x1: list[torch.Tensor], x0: list[torch.Tensor]) -> list[torch.Tensor]:
        """Velocity d x_t / d t = x1 - x0 per sample."""
        return [a - b for a, b in zip(x1, x0)]

    def loss(
        self, pred: list[torch.Tensor], target: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE over a packed batch -> (scalar loss, (B,) detached per-sample losses).

        "sample": each sample's mean over its own elements, then the mean over samples, so a 512^2
        and a 1024^2 image count the same. "token": every element of the batch counts the same.
        Padding never enters: each sample is its own tensor."""
        if len(pred) != len(target) or not pred:
            raise ValueError(f"loss: {len(pred)} predictions for {len(target)} targets")
        sq = [(p.float() - y.float()).pow(2) for p, y in zip(pred, target)]
        per_sample = torch.stack([s.mean() for s in sq])  # (B,)
        if self.cfg.reduction == "sample":
            loss = per_sample.mean()
        else:
            loss = torch.stack([s.sum() for s in sq]).sum() / sum(s.numel() for s in sq)
        return loss, per_sample.detach()

    def t_bin_losses(self, per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
        """Mean loss of the samples falling in each of `t_bins` equal bins of t in [0, 1]; empty bins omitted.
        Keys "loss_t/<lo>-<hi>" (e.g. "loss_t/0.0-0.1")."""
        nb = self.cfg.t_bins
        idx = (t.detach().float().cpu() * nb).long().clamp(0, nb - 1)  # (B,)
        ps = per_sample.detach().float().cpu()
        out = {}
        for b in range(nb):
            sel = idx == b
            if sel.any():
                out[f"loss_t/{b / nb:.1f}-{(b + 1) / nb:.1f}"] = float(ps[sel].mean())
        return out

