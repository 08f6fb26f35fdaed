"""python bench/sdxl_step.py [--repeats 5] [--threads 1] [--batch 2] [--size 128]

Training-step time of our SDXL family (`parts.prepare` + the training module + AdamW) against a loop
written like diffusers' examples/text_to_image/train_text_to_image_sdxl.py (VAE encode * scaling
factor, randint timesteps, DDPMScheduler.add_noise / get_velocity, the example's encode_prompt with
hidden_states[-2] and pooled bigG, add_time_ids, UNet, MSE, AdamW), on the same tiny SDXL (random
weights from lumina_illus.models.tiny_sdxl), the same images and captions, in one process. Both use
v-prediction with zero-terminal SNR and frozen text encoders (the example cannot train them), so the
work is identical; steps alternate between the two loops so machine noise hits both. Prints ms/step
of each and the ratio (ours / theirs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lumina_illus.config import config_from_raw
from lumina_illus.data.batch import Batch
from lumina_illus.families import get_family
from lumina_illus.models.tiny_sdxl import make_tiny_sdxl


def diffusers_example_step(comps, scheduler, opt, batch: Batch, gen: torch.Generator) -> float:
    """One step the way train_text_to_image_sdxl.py computes it (v_prediction branch)."""
    imgs = torch.stack(batch.images)  # (B, 3, H, W)
    with torch.no_grad():
        latents = comps.vae.encode(imgs).latent_dist.mean * comps.vae.config.scaling_factor  # (B, 4, h, w)
    noise = torch.randn(latents.shape, generator=gen)
    ts = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = scheduler.add_noise(latents, noise, ts)
    with torch.no_grad():  # encode_prompt of the example: penultimate layers, pooled from text_encoder_2
        embeds = []
        for tok, te in ((comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)):
            ids = tok(batch.captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        prompt_embeds = torch.cat(embeds, dim=-1)  # (B, 77, D1+D2)
    add_time_ids = torch.tensor([[*o, *c, *t] for o, c, t in zip(batch.original_sizes, batch.crops, batch.target_sizes)],
                                dtype=torch.float32)
    pred = comps.unet(noisy, ts, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}).sample
    target = scheduler.get_velocity(latents, noise, ts)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per loop (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler

    from lumina_illus.models.sdxl import load_components

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_sdxl(Path(tmp) / "sdxl", seed=0)
        cfg = config_from_raw({
            "family": "sdxl",
            "model": {"pretrained": str(tiny), "objective": {"prediction": "v", "zero_terminal_snr": True}},
            "optim": {"lr": 1e-5, "text_encoder_lr": None},
        }, "bench")
        parts = get_family("sdxl").build_training(cfg, torch.device("cpu"))
        ours_opt = torch.optim.AdamW([p for g in parts.param_groups for p in g["params"]], lr=1e-5)

        comps = load_components(tiny)  # the reference loop's own copy of the same weights
        comps.vae.requires_grad_(False)
        comps.text_encoder.requires_grad_(False)
        comps.text_encoder_2.requires_grad_(False)
        comps.unet.train()
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True)
        ref_opt = torch.optim.AdamW(comps.unet.parameters(), lr=1e-5)

        g = torch.Generator().manual_seed(0)
        s = args.size
        batch = Batch(keys=[f"k{i}" for i in range(args.batch)], captions=["1girl, red hair, smile"] * args.batch,
                      images=[torch.rand(3, s, s, generator=g) * 2 - 1 for _ in range(args.batch)],
                      original_sizes=[(s, s)] * args.batch, crops=[(0, 0)] * args.batch, target_sizes=[(s, s)] * args.batch)

        def ours() -> None:
            out = parts.module(**parts.prepare(batch, g))
            out.loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)

        def theirs() -> None:
            diffusers_example_step(comps, scheduler, ref_opt, batch, g)

        ours(), theirs()  # warm-up
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in tqdm(range(args.repeats), desc="steps"):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    o, r = statistics.median(times["ours"]) * 1e3, statistics.median(times["theirs"]) * 1e3
    print(f"work: {args.batch} images {s}x{s}, tiny SDXL UNet ({sum(p.numel() for p in comps.unet.parameters())/1e6:.2f}M params), "
          f"v-pred + ZTSNR, frozen text encoders, {args.threads} thread(s)")
    print(f"ours (family prepare + module + AdamW): {o:.1f} ms/step (median of {args.repeats})")
    print(f"diffusers example loop:                {r:.1f} ms/step")
    print(f"ratio ours / theirs: {o / r:.3f}")


if __name__ == "__main__":
    main()
