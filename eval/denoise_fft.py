"""python eval/denoise_fft.py runs/lu2b/ckpt/step_0026500 --prompt "empty black background" --steps 10 --guidance 4 1

Denoising spectra of one checkpoint (either family, detected): runs a short sampler, decodes every
intermediate latent x_t and clean prediction x0, computes radially averaged FFT power spectra per step
and plots low- vs high-frequency energy over the steps. Several --guidance values (e.g. 4 and 1 = no
CFG, as in the seed) give one run each. Writes under --out: g<guidance>/denoise_fft.json,
g<guidance>/denoise_fft.png and g<guidance>/frames/{x,x0}_XX.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from lumina_illus.evaluation.char_recall import parse_sizes  # noqa: E402
from lumina_illus.evaluation.spectrum import DEFAULT_CUTOFF, denoise_spectra, plot_spectra  # noqa: E402
from lumina_illus.families import Generator, detect_family  # noqa: E402


def run(generator: Generator, out: Path, prompt: str, size: tuple[int, int], seed: int, steps: int,
        guidances: list[float], cutoff: float) -> list[Path]:
    """One trajectory per guidance value -> JSON + PNG + frames; returns the JSON paths."""
    written = []
    for g in guidances:
        d = out / f"g{g:g}"
        res = denoise_spectra(generator, prompt, size, seed, steps, g, cutoff, frames_dir=d / "frames")
        d.mkdir(parents=True, exist_ok=True)
        (d / "denoise_fft.json").write_text(json.dumps(res))
        plot_spectra(res, d / "denoise_fft.png")
        print(f"guidance {g:g}: step  t      x:low      x:high     x0:low     x0:high")
        for r in res["trajectory"]:
            print(f"{'':>12}{r['step']:>4}  {r['t']:.3f}  {r['x']['low']:.3e}  {r['x']['high']:.3e}  "
                  f"{r['x0']['low']:.3e}  {r['x0']['high']:.3e}")
        print(f"-> {d / 'denoise_fft.json'}, {d / 'denoise_fft.png'}")
        written.append(d / "denoise_fft.json")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="exported checkpoint file or ckpt/step_X folder")
    ap.add_argument("--prompt", default="empty black background")
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, nargs="+", default=[4.0], help="one run per value; 1 = no CFG")
    ap.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF, help="low/high boundary, cycles per pixel")
    ap.add_argument("--out", default="denoise_fft", help="output folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    (size,) = parse_sizes(args.size)
    gen = detect_family(args.ckpt).load_generator(args.ckpt, torch.device(args.device))
    return run(gen, Path(args.out), args.prompt, size, args.seed, args.steps, args.guidance, args.cutoff)


if __name__ == "__main__":
    main()
