"""python bench/train_memory.py [--gpus 32] [--micro-batch 4] [--size 1024] [--probe-size 256]

Memory per GPU of training the 2.6B Lumina-2 NextDiT with this trainer under DeepSpeed ZeRO-2 and
ZeRO-3 (bf16 weights, fp32 master weights + AdamW moments, fp32 gradient accumulation, sharded fp32
EMA, frozen bf16 Gemma-2-2B and Flux VAE on every GPU), at the real config's micro-batch and image
size (configs/lu2b_768.yaml: 4 x 1024^2 + 256 caption tokens each).

Parameter counts are exact: NextDiT, Gemma-2-2B and the Flux VAE are built from their published
configs on the meta device. Activation memory is measured: one forward of the real 2.6B-width model
(dim 2304, 24/8 heads, both refiners) with 1 and with 2 main layers at --probe-size on CPU, counting
the bytes autograd saves for backward (saved_tensors_hooks, deduplicated by storage), so
(2 layers - 1 layer) is one layer and the rest is embedders + refiners; both scale linearly with
tokens because attention saves no (N, N) matrix (flash / memory-efficient kernels, as on H100), and
the count is halved from the fp32 probe to bf16. With checkpointing, one block's full activations
(recomputed during backward) are added. No GPU is needed; nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

GiB = 1024**3


def count_params() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import Gemma2Config, Gemma2Model

    from lumina_illus.models.nextdit import NextDiT, nextdit_2b
    from lumina_illus.models.tiny import FLUX_VAE, GEMMA2_2B

    with torch.device("meta"):
        dit = NextDiT(nextdit_2b())
        gemma = Gemma2Model(Gemma2Config(**GEMMA2_2B))  # google/gemma-2-2b config.json
        vae = AutoencoderKL(**FLUX_VAE)  # black-forest-labs/FLUX.1-dev vae/config.json
    return {
        "dit_total": sum(p.numel() for p in dit.parameters()),
        "dit_trainable": sum(p.numel() for p in dit.parameters() if p.requires_grad),
        "gemma": sum(p.numel() for p in gemma.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }


def saved_bytes(n_layers: int, size: int, cap_tokens: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one fp32 forward of one sample (size x size pixels)."""
    from lumina_illus.models.nextdit import NextDiT, nextdit_2b

    torch.manual_seed(0)
    model = NextDiT(nextdit_2b(n_layers=n_layers, attention="sdpa"))
    model.set_activation_checkpointing(checkpointing)
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        # an (N, N) attention matrix saved by the CPU math kernel: flash kernels on H100 keep none
        attn_matrix = t.dim() >= 3 and t.shape[-1] == t.shape[-2] >= 256
        if s.data_ptr() not in params and not attn_matrix:  # weights are counted separately
            storages[s.data_ptr()] = s.nbytes()
        return t

    latent = size // 8
    x = [torch.randn(16, latent, latent)]  # (C, h, w)
    cap = torch.randn(1, cap_tokens, 2304)  # (1, L, D)
    mask = torch.ones(1, cap_tokens, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.rand(1), cap, mask)
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=32, help="data-parallel ranks (ZeRO partitions)")
    ap.add_argument("--micro-batch", type=int, default=4, help="images per GPU per forward")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--cap-tokens", type=int, default=256, help="caption tokens per image")
    ap.add_argument("--probe-size", type=int, default=256, help="image side of the CPU activation probe")
    args = ap.parse_args()
    torch.set_num_threads(1)

    n = count_params()
    P, N = n["dit_trainable"], args.gpus
    print(f"NextDiT params {n['dit_total']:,} (trainable {P:,}), Gemma-2-2B {n['gemma']:,}, Flux VAE {n['vae']:,}")

    probe_tokens = (args.probe_size // 16) ** 2 + args.cap_tokens
    real_tokens = (args.size // 16) ** 2 + args.cap_tokens
    scale = real_tokens / probe_tokens * args.micro_batch / 2  # tokens, samples, fp32 -> bf16
    act, layer = {}, {}
    for ckpt in (False, True):
        one, two = saved_bytes(1, args.probe_size, args.cap_tokens, ckpt), saved_bytes(2, args.probe_size, args.cap_tokens, ckpt)
        per_layer, rest = two - one, one - (two - one)
        act[ckpt] = (rest + 26 * per_layer) * scale
        layer[ckpt] = per_layer * scale
        print(f"probe {args.probe_size}px ({probe_tokens} tokens), checkpointing={ckpt}: one layer "
              f"{per_layer / 2**20:.1f} MiB, embedders+refiners {rest / 2**20:.1f} MiB (fp32, 1 sample)")

    bucket = 2 * 5e8 * 2  # reduce_bucket_size 5e8 bf16 elements, double-buffered (overlap_comm)
    rows = {
        "bf16 weights (NextDiT)": {2: 2 * n["dit_total"], 3: 2 * n["dit_total"] / N + 2 * 1e9 * 0.1},
        "fp32 master + AdamW m, v": {2: 12 * P / N, 3: 12 * P / N},
        "fp32 gradient partition": {2: 4 * P / N, 3: 4 * P / N},
        "gradient buckets (bf16)": {2: bucket, 3: bucket},
        "EMA shard (fp32)": {2: 4 * P / N, 3: 4 * P / N},
        "frozen Gemma-2-2B + Flux VAE (bf16)": {2: 2 * (n["gemma"] + n["vae"]), 3: 2 * (n["gemma"] + n["vae"])},
    }
    print(f"\nper GPU, {N} GPUs, micro-batch {args.micro_batch} x {args.size}^2 "
          f"({real_tokens} tokens per sample), GiB:")
    print(f"| {'item':40s} | ZeRO-2 | ZeRO-3 |")
    print(f"|{'-' * 42}|--------|--------|")
    for k, v in rows.items():
        print(f"| {k:40s} | {v[2] / GiB:6.1f} | {v[3] / GiB:6.1f} |")
    base2 = sum(v[2] for v in rows.values())
    base3 = sum(v[3] for v in rows.values())
    # with checkpointing, backward recomputes one block at a time: its full activations come on top
    act[True] += layer[False]
    for ckpt in (False, True):
        label = f"activations ({'with' if ckpt else 'no'} checkpointing)"
        print(f"| {label:40s} | {act[ckpt] / GiB:6.1f} | {act[ckpt] / GiB:6.1f} |")
    for ckpt in (False, True):
        label = f"total ({'with' if ckpt else 'no'} checkpointing)"
        print(f"| {label:40s} | {(base2 + act[ckpt]) / GiB:6.1f} | {(base3 + act[ckpt]) / GiB:6.1f} |")
    print("\nZeRO-3 weights: 1/N of the bf16 weights plus up to 0.1 x 1e9 gathered elements in flight "
          "(stage3_max_live_parameters 1e9 default, ~10% live at a time); CUDA context and allocator "
          "fragmentation (typically 2-5 GiB) are not included.")


if __name__ == "__main__":
    main()
