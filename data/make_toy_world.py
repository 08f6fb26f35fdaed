"""python data/make_toy_world.py --out runs/toy --seed 0

Build the toy illustration world and its tiny components (cached; re-runs reuse what matches):
webdataset shards with control tokens, characters.csv, a tiny Flux-architecture VAE trained on the
world, a tiny Gemma-2 with a tokenizer fitted on its captions, a WD-format character tagger, and with
--sdxl the tiny SDXL pipeline (its VAE trained on the world too). Prints each part's report (VAE PSNR,
tagger held-out accuracy) and writes them to <out>/world.json. Layout: lumina_illus/toyworld/components.py.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", default="runs/toy", help="folder for shards, characters.csv and components/")
    ap.add_argument("--seed", type=int, default=0, help="world seed: every render, tag and caption derives from it")
    ap.add_argument("--most", type=int, default=2000, help="images of the most frequent character")
    ap.add_argument("--fewest", type=int, default=20, help="images of the rarest character")
    ap.add_argument("--sdxl", action="store_true", help="also build the tiny SDXL components")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                    help="torch CPU threads for component training")  # fmt: skip
    args = ap.parse_args()

    import torch

    from lumina_illus.toyworld.components import build_toy_world
    from lumina_illus.toyworld.world import WorldConfig

    torch.set_num_threads(args.threads)
    info = build_toy_world(args.out, WorldConfig(seed=args.seed, most=args.most, fewest=args.fewest), sdxl=args.sdxl)
    r = info["reports"]
    print(f"[toyworld] {r['shards']['samples']} images in {r['shards']['shards']} shards: {args.out}/shards/")
    print(f"[toyworld] characters: {args.out}/characters.csv")
    print(f"[toyworld] VAE held-out PSNR {r['vae']['psnr_heldout']:.1f} dB "
          f"(untrained {r['vae']['psnr_heldout_untrained']:.1f} dB): {args.out}/components/vae")  # fmt: skip
    t = r["tagger"]
    print(f"[toyworld] tagger held-out character accuracy {t['heldout_char_accuracy']:.3f} on {t['heldout_images']} "
          f"renders ({t['heldout_char_accuracy_augmented']:.3f} blurred/noisy, "
          f"{t['heldout_char_accuracy_vae_roundtrip']:.3f} after a VAE round trip): {args.out}/components/tagger")  # fmt: skip
    print(f"[toyworld] text encoder: {args.out}/components/gemma (vocab {r['gemma']['vocab_size']})")
    if "sdxl" in r:
        print(f"[toyworld] SDXL: {args.out}/components/sdxl (VAE PSNR {r['sdxl']['vae']['psnr_heldout']:.1f} dB)")
    print(f"[toyworld] all reports: {args.out}/world.json")


if __name__ == "__main__":
    main()
