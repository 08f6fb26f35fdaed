"""Brief training of a tiny diffusers AutoencoderKL (the Flux-architecture one for Lumina, the SDXL one
for SDXL) on toy-world renders, so that latents carry the world's colours and shapes and decoded
samples are recognisable.

    make_tiny_flux_vae("runs/toy/components/vae")
    report = train_vae("runs/toy/components/vae", world_cfg, scale=0.3611, shift=0.1159)

1. Start from the random VAE the family's tiny builder wrote into `vae_dir`.
2. Train encoder + decoder on random crops: MSE + L1 reconstruction + a small KL to N(0, I).
3. Re-parametrise the latent space so that the family's published normalisation,
   z = (mean - shift) * scale, gives zero-mean unit-variance latents per channel, so the toy configs
   keep the published VAEConfig values. With quant convs (SDXL) the 1x1 quant/post-quant convs absorb
   the change exactly; without them (Flux) the encoder's last conv is changed exactly and the decoder's
   first conv absorbs the inverse (exact except where its zero padding meets the shift at the border;
   GroupNorm and the mid-block attention spread that difference over the image, which step 4 repairs).
4. Fine-tune the decoder alone for a few steps, then report held-out PSNR on whole images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lumina_illus.toyworld.render import render
from lumina_illus.toyworld.spec import CHARACTERS
from lumina_illus.toyworld.world import WorldConfig, random_scene


@dataclass
class VAETrainConfig:
    images: int = 1200  # training renders
    crop: int = 32  # training crop side (pixels): small crops, many steps
    steps: int = 1000  # encoder + decoder steps (~1.5-2 min on 2 CPU cores)
    decoder_steps: int = 150  # decoder-only steps after the latent re-parametrisation
    batch_size: int = 16
    lr: float = 1e-3  # 2e-3 and above is unstable for this AE (colour is never learned)
    kl_weight: float = 1e-4
    chroma_weight: float = 1.0  # extra MSE on colour (pixel minus its channel mean)
    heldout: int = 48  # whole images for the reported PSNR
    seed: int = 0


def _to_tensor(img: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def _renders(n: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(f"vae-renders:{seed}")
    scenes = [random_scene(rng.choice([*CHARACTERS, None]), rng) for _ in range(n)]
    return [_to_tensor(render(s)) for s in tqdm(scenes, desc="vae renders", unit="img", leave=False)]


def _crops(images: list[torch.Tensor], n: int, side: int, rng: random.Random) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = images[rng.randrange(len(images))]
        y, x = rng.randint(0, img.shape[1] - side), rng.randint(0, img.shape[2] - side)
        out.append(img[:, y : y + side, x : x + side])
    return torch.stack(out)  # (n, 3, side, side)


def warmup_cosine(step: int, total: int, warmup: float = 0.1) -> float:
    """LR factor: linear warm-up over the first `warmup` share of steps, then cosine to zero."""
    w = max(1, round(total * warmup))
    return min(1.0, (step + 1) / w) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _mean_psnr(vae: torch.nn.Module, images: list[torch.Tensor]) -> float:
    with torch.no_grad():
        vals = [psnr(vae.decode(vae.encode(x[None]).latent_dist.mean).sample[0], x) for x in images]
    return float(np.mean(vals))


@torch.no_grad()
def normalise_latents(
    vae: torch.nn.Module, images: list[torch.Tensor], scale: float, shift: float
) -> tuple[list[float], list[float]]:
    """Step 3: make (mean - shift) * scale zero-mean unit-variance per channel on `images`.
    Returns the per-channel (mean, std) measured before the change."""
    z = torch.cat([vae.encode(x[None]).latent_dist.mean.flatten(2) for x in images], dim=2)[0]  # (C, N)
    mu, sd = z.mean(1), z.std(1).clamp_min(1e-4)  # (C,)
    a = (1.0 / scale) / sd  # (C,) new = a * (old - mu) + shift
    c = mu.numel()
    # the last conv producing the 2C posterior parameters (C means then C log-variances)
    enc = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    enc.weight[:c] *= a[:, None, None, None]
    enc.bias[:c] = a * (enc.bias[:c] - mu) + shift
    enc.bias[c:] += 2 * torch.log(a)  # variances scale by a^2
    dec = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder.conv_in
    offset = mu - shift / a  # (C,) old = new / a + offset, folded into the first decoder conv
    dec.bias += (dec.weight.sum(dim=(2, 3)) * offset[None]).sum(1)
    dec.weight /= a[None, :, None, None]
    return mu.tolist(), sd.tolist()


def train_vae(
    vae_dir: str | Path, world: WorldConfig, scale: float, shift: float, cfg: VAETrainConfig | None = None
) -> dict[str, Any]:
    """Train the AutoencoderKL saved in `vae_dir` on world renders, normalise its latents for
    (mean - shift) * scale, save it back in place, return metrics."""
    from diffusers import AutoencoderKL

    cfg = cfg or VAETrainConfig()
    out = Path(vae_dir)
    vae = AutoencoderKL.from_pretrained(str(out))
    torch.manual_seed(cfg.seed + world.seed)
    images = _renders(cfg.images, world.seed)
    heldout = _renders(cfg.heldout, world.seed + 10_000)
    rng = random.Random(cfg.seed)
    report: dict[str, Any] = {"psnr_heldout_untrained": _mean_psnr(vae, heldout)}

    def run(params: list[torch.nn.Parameter], steps: int, desc: str, kl: bool) -> float:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, steps))
        loss = torch.zeros(())
        for _ in (bar := tqdm(range(steps), desc=desc, unit="step", leave=False)):
            x = _crops(images, cfg.batch_size, cfg.crop, rng)  # (B, 3, crop, crop)
            post = vae.encode(x).latent_dist
            # decode the posterior mean: training encodes with the mean (VAEConfig.sample_posterior off), and
            # sampling with the initial unit variance would drown the small initial means in noise
            rec = vae.decode(post.mean).sample  # (B, 3, crop, crop)
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            if cfg.chroma_weight:  # colour is what tells the characters apart, and a young AE learns it last
                loss = loss + cfg.chroma_weight * F.mse_loss(rec - rec.mean(1, keepdim=True), x - x.mean(1, keepdim=True))
            if kl:  # keeps the latent means near N(0, I) in scale; normalise_latents sets the exact scale
                loss = loss + cfg.kl_weight * post.kl().mean() / x[0].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        return float(loss.detach())

    vae.train()
    report["train_loss"] = run(list(vae.parameters()), cfg.steps, "vae training", kl=True)
    vae.eval()
    report["psnr_heldout_before_normalise"] = _mean_psnr(vae, heldout)
    mu, sd = normalise_latents(vae, images[:200], scale, shift)
    report["raw_latent_mean"], report["raw_latent_std"] = mu, sd
    vae.decoder.train()
    vae.encoder.requires_grad_(False)
    report["decoder_loss"] = run(list(vae.decoder.parameters()), cfg.decoder_steps, "vae decoder fine-tune", kl=False)
    vae.eval()
    report["psnr_heldout"] = _mean_psnr(vae, heldout)
    with torch.no_grad():  # the normalised latents the DiT will see
        z = torch.cat([vae.encode(x[None]).latent_dist.mean.flatten(2) for x in heldout], 2)[0]  # (C, N)
        zn = (z - shift) * scale
    report["normalised_latent_mean"] = float(zn.mean())
    report["normalised_latent_std"] = float(zn.std())
    vae.requires_grad_(True)
    vae.save_pretrained(str(out))
    return report
