"""python -m lumina_illus.models.convert SRC DST --layout diffusers|original|comfy [--dtype bf16|fp16|fp32|keep]

Convert Lumina-Image-2.0 NextDiT weights between the three public layouts. SRC is any of them
(detected automatically): an original .pth/.safetensors, a ComfyUI single file, a diffusers folder,
or one of our export folders. DST is a folder; the written files are
  original  DST/lumina2.safetensors
  comfy     DST/lumina2_comfy.safetensors
  diffusers DST/config.json + DST/diffusion_pytorch_model.safetensors
Our run metadata ("lumina_illus" header key) is carried over when SRC has it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lumina_illus.families import read_metadata
from lumina_illus.models.checkpoint_io import LAYOUTS, load_checkpoint, save_layout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="checkpoint file or folder in any layout")
    ap.add_argument("dst", type=Path, help="output folder")
    ap.add_argument("--layout", required=True, choices=LAYOUTS, help="layout to write")
    ap.add_argument("--dtype", default="keep", choices=list(DTYPES), help="cast weights (default: keep)")
    args = ap.parse_args(argv)

    state, cfg = load_checkpoint(args.src)
    metadata = read_metadata(args.src) or None
    paths = save_layout(state, cfg, args.dst, args.layout, metadata=metadata, dtype=DTYPES[args.dtype])
    n = sum(v.numel() for v in state.values())
    print(f"{args.src} -> {args.layout}: {n:,} parameters")
    for p in paths:
        print(f"  wrote {p}")
    return paths


if __name__ == "__main__":
    main()
