"""python bench/model_step.py [--repeats 5] [--threads 1] [--preset small|2b] [--device cpu|cuda] [--dtype fp32|bf16]

Forward+backward time of our packed NextDiT against diffusers' Lumina2Transformer2DModel on the
same mixed-resolution work, same process, same weights (copied through our converter). diffusers
handles one resolution per call, so its batch is grouped by size: one call per size group, with
captions padded to the group's longest. Runs alternate between the two models to share machine noise.
Also times the two SDPA formulations of packed attention (padded block vs block-diagonal mask),
and prints the analytic FLOPs of the 2.6B model at 1024x1024 with the H100 images/s they imply.

On a GPU: `--device cuda --dtype bf16 --preset 2b --scale 4 --no-reference --activation-checkpointing
[--attention flash|sdpa]` gives
tokens/s and MFU of the full model (989 TFLOP/s bf16 dense peak for H100 SXM).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from lumina_illus.models.attention import sdpa_block_diagonal, varlen_attention
from lumina_illus.models.checkpoint_io import original_to_diffusers, to_diffusers_config
from lumina_illus.models.nextdit import NextDiT, NextDiTConfig, nextdit_2b

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def small_config(attention: str) -> NextDiTConfig:
    """Big enough that matmuls dominate Python overhead, small enough for a shared CPU."""
    return NextDiTConfig(
        dim=256, n_layers=4, n_refiner_layers=1, n_heads=8, n_kv_heads=4, multiple_of=64,
        cap_feat_dim=128, axes_dims=(10, 10, 12), attention=attention,
    )  # fmt: skip


def make_work(cfg: NextDiTConfig, device: str, dtype: torch.dtype, scale: int) -> dict:
    """Mixed-resolution batch: several latent sizes (repeated, so diffusers gets real groups) and
    captions of different lengths."""
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (24, 40), (40, 24), (32, 32), (16, 64), (24, 40), (48, 16), (32, 32)]
    sizes = [(h * scale, w * scale) for h, w in sizes]
    cap_lens = torch.randint(20, 120, (len(sizes),), generator=g).tolist()
    max_cap = max(cap_lens)
    return {
        "latents": [torch.randn(cfg.in_channels, h, w, generator=g).to(device, dtype) for h, w in sizes],
        "t": torch.rand(len(sizes), generator=g).to(device),
        "cap_feats": torch.randn(len(sizes), max_cap, cfg.cap_feat_dim, generator=g).to(device, dtype),
        "cap_mask": (torch.arange(max_cap)[None] < torch.tensor(cap_lens)[:, None]).to(device),
        "cap_lens": cap_lens,
    }


def step_ours(model: NextDiT, work: dict) -> None:
    out = model(work["latents"], work["t"], work["cap_feats"], work["cap_mask"])
    sum(o.float().square().mean() for o in out).backward()


def step_diffusers(model: torch.nn.Module, work: dict) -> None:
    groups = defaultdict(list)  # one diffusers call per latent size
    for i, x in enumerate(work["latents"]):
        groups[tuple(x.shape)].append(i)
    for idx in groups.values():
        n = max(work["cap_lens"][i] for i in idx)
        out = model(
            torch.stack([work["latents"][i] for i in idx]),
            work["t"][idx],
            work["cap_feats"][idx, :n],
            work["cap_mask"][idx, :n],
            return_dict=False,
        )[0]
        out.float().square().mean(dim=(1, 2, 3)).sum().backward()


def timed(fn, sync) -> float:  # noqa: ANN001 - small local helper
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_attention(cfg: NextDiTConfig, work: dict, repeats: int, device: str, dtype: torch.dtype) -> dict:
    """Packed attention alone (fwd+bwd) on this batch's joint sequences: padded SDPA vs block-diagonal."""
    p2 = cfg.patch_size**2
    lens = [c + x.shape[1] * x.shape[2] // p2 for c, x in zip(work["cap_lens"], work["latents"])]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    n = sum(lens)
    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(n, cfg.n_heads, cfg.head_dim, generator=g).to(device, dtype)
    kv0 = torch.randn(2, n, cfg.n_kv_heads, cfg.head_dim, generator=g).to(device, dtype)
    impls = {
        "padded": lambda q, k, v: varlen_attention(q, k, v, cu, max(lens), backend="sdpa"),
        "block_diagonal": lambda q, k, v: sdpa_block_diagonal(q, k, v, cu),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(repeats + 1):
        for name, fn in impls.items():
            q, k, v = (t.clone().requires_grad_(True) for t in (q0, kv0[0], kv0[1]))
            times[name].append(timed(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).sum().backward(), sync))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per model (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--preset", choices=["small", "2b"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--attention", choices=["auto", "flash", "sdpa"], default="auto")
    ap.add_argument("--scale", type=int, default=1, help="multiply every latent side (4 = 1024px-class sizes)")
    ap.add_argument("--no-reference", action="store_true", help="skip diffusers (e.g. the 2B model on one GPU)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    cfg = small_config(args.attention) if args.preset == "small" else nextdit_2b(attention=args.attention)
    torch.manual_seed(0)
    ours = NextDiT(cfg)
    with torch.no_grad():  # random adaLN/output weights so both models do full, non-degenerate work
        for p in ours.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    ours = ours.to(args.device, dtype)
    ours.set_activation_checkpointing(args.activation_checkpointing)
    work = make_work(cfg, args.device, dtype, args.scale)
    models = {"ours (packed)": lambda: step_ours(ours, work)}
    if not args.no_reference:
        from diffusers import Lumina2Transformer2DModel

        dcfg = {k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")}
        ref = Lumina2Transformer2DModel(**dcfg)
        ref.load_state_dict(original_to_diffusers(ours.state_dict(), cfg), strict=True)
        ref = ref.to(args.device, dtype)
        models["diffusers (grouped by size)"] = lambda: step_diffusers(ref, work)

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in tqdm(range(args.repeats + 1), desc="fwd+bwd steps"):
        for name, fn in models.items():
            times[name].append(timed(fn, sync))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}

    p2 = cfg.patch_size**2
    img_tokens = [x.shape[1] * x.shape[2] // p2 for x in work["latents"]]
    flops = 3 * sum(ours.flops(i, c) for i, c in zip(img_tokens, work["cap_lens"]))
    cpu = _cpu_name()
    print(f"\nmachine: {cpu}; {args.threads} thread(s); torch {torch.__version__}; {args.device} {args.dtype}")
    print(f"config: {args.preset} dim={cfg.dim} layers={cfg.n_layers}+{cfg.n_refiner_layers}x2 heads={cfg.n_heads}/{cfg.n_kv_heads}")
    sizes = sorted({tuple(x.shape[1:]) for x in work["latents"]})
    print(f"work: {len(img_tokens)} samples, latent sizes {sizes}, {sum(img_tokens)} image + {sum(work['cap_lens'])} caption tokens")
    for name, sec in med.items():
        print(f"  {name:30s} {sec * 1e3:9.1f} ms/step  {sum(img_tokens) / sec:10.0f} img tok/s  {flops / sec / 1e9:8.2f} GFLOP/s")
    if len(med) == 2:
        a, b = med.values()
        print(f"  speed-up ours vs diffusers: {b / a:.2f}x")
    if args.device == "cuda":
        mfu = flops / med["ours (packed)"] / H100_BF16_PEAK
        print(f"  MFU (vs {H100_BF16_PEAK / 1e12:.0f} TFLOP/s): {mfu:.1%}")

    att = bench_attention(cfg, work, args.repeats, args.device, dtype)
    print(f"packed attention fwd+bwd: padded SDPA {att['padded'] * 1e3:.1f} ms, block-diagonal SDPA "
          f"{att['block_diagonal'] * 1e3:.1f} ms ({att['block_diagonal'] / att['padded']:.2f}x)")  # fmt: skip

    with torch.device("meta"):
        big = NextDiT(nextdit_2b())
    f = big.flops(4096, 256)
    print("2.6B NextDiT at 1024x1024 (4096 image + 256 caption tokens):")
    print(f"  forward {f / 1e12:.2f} TFLOP, train step (3x) {3 * f / 1e12:.2f} TFLOP per image")
    for mfu in (0.4, 0.5):
        print(f"  H100 at {mfu:.0%} MFU: {mfu * H100_BF16_PEAK / (3 * f):.2f} images/s per GPU")


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} torch threads of {__import__('os').cpu_count()} cores"


if __name__ == "__main__":
    main()
