"""python -m lumina_illus.sample --ckpt runs/lu2b/ckpt/step_0026500 --prompt "1girl, red hair" --size 1024x1024 --steps 30 --cfg 4.0 --seed 0 --out sample.png

Text-to-image from any exported checkpoint of any family (detected from the checkpoint's metadata or
its tensor names): a ckpt/step_X folder (EMA weights preferred), a single exported file, or a
diffusers folder. Checkpoints made elsewhere carry no paths to their frozen parts: give them with
--text-encoder / --vae. Several --prompt flags or --num > 1 write out_0.png, out_1.png, ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lumina_illus.families import detect_family


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="step folder, exported file or diffusers folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT in pixels")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's config)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="sample.png", help="output PNG (suffixed _i when several images)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-encoder", default=None, help="text encoder path (overrides the checkpoint's)")
    p.add_argument("--vae", default=None, help="VAE path (overrides the checkpoint's)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise SystemExit("--num must be >= 1")
    family = detect_family(args.ckpt)
    overrides = {}
    if args.text_encoder:
        overrides["text_encoder_path"] = args.text_encoder
    if args.vae:
        overrides["vae_path"] = args.vae
    gen = family.load_generator(args.ckpt, torch.device(args.device), **overrides)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = gen.generate(
        prompts, [args.size] * len(prompts), seeds, steps=args.steps, guidance=args.cfg,
        negative_prompt=args.negative, progress=True,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
