"""python bench/sdxl_memory.py [--gpus 8 64] [--micro-batch 12] [--size 1024] [--chunks 3]

Memory plan of full-size SDXL training (UNet + CLIP-L + OpenCLIP bigG all trainable) under DeepSpeed
ZeRO-2 with bf16 weights, fp32 master weights, AdamW and fp32 gradient accumulation, per GPU.
Nothing is downloaded and nothing big is allocated: the three models are built from the published
SDXL-base configs on the meta device; parameter counts are exact, activation memory is the sum of the
tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by
storage) in one bf16 forward at the given size, with and without activation checkpointing, with
attention accounted like a flash / memory-efficient kernel (no saved (N, N) matrix), as on H100s.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

GiB = 1024**3

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


@contextmanager
def saved_bytes(counter: dict[str, int], exclude: set[int]):
    """Count bytes of distinct storages autograd saves for backward inside the block, except the
    storages in `exclude` (the weights, which the plan counts separately)."""
    seen: set[int] = set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata  # the StorageImpl pointer: unique per storage, also on meta
        if key not in seen:
            seen.add(key)
            counter["bytes"] = counter.get("bytes", 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class FlashLikeAttention(torch.autograd.Function):
    """Stand-in for a memory-efficient SDPA kernel (flash / cuDNN / mem-efficient on GPUs): saves q, k,
    v, the output and the fp32 log-sum-exp rows, never the (N, N) attention matrix that the math
    fallback (the only SDPA path on meta tensors) would save."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, N, d) each
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def flash_like_sdpa():
    orig = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return FlashLikeAttention.apply(q, k, v)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def build(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).to(dtype)
    return unet, te1, te2


def activation_bytes(unet, te1, te2, batch: int, size: int, chunks: int, checkpointing: bool) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward; with checkpointing also the largest
    checkpointed unit's own activations (recomputed during backward, alive beside the saved inputs)."""
    from lumina_illus.models.sdxl import encode_chunks

    dev, dtype = torch.device("meta"), next(unet.parameters()).dtype
    if checkpointing:
        unet.enable_gradient_checkpointing()
        te1.gradient_checkpointing_enable()
        te2.gradient_checkpointing_enable()
    else:
        unet.disable_gradient_checkpointing()
        te1.gradient_checkpointing_disable()
        te2.gradient_checkpointing_disable()
    unet.train(), te1.train(), te2.train()
    weights = {p.untyped_storage()._cdata for m in (unet, te1, te2) for p in m.parameters()}
    total: dict[str, int] = {}
    ids = torch.zeros(batch, chunks, 77, dtype=torch.long, device=dev)
    with saved_bytes(total, weights):
        embeds, pooled = encode_chunks(te1, te2, ids, ids)  # (B, chunks*77, 2048), (B, 1280)
        h = size // 8
        x = torch.zeros(batch, 4, h, h, device=dev, dtype=dtype, requires_grad=False)
        unet(x, torch.zeros(batch, device=dev), embeds,
             added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.zeros(batch, 6, device=dev, dtype=dtype)})
    out = {"saved": total.get("bytes", 0), "block_peak": 0}
    if checkpointing:  # one block recomputed at a time: measure the biggest block's own saved tensors
        unet.disable_gradient_checkpointing()
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        # diffusers checkpoints each resnet and each transformer block: those are the recompute units
        blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
        per_block: dict[int, int] = {}
        hooks = []
        for i, b in enumerate(blocks):
            def pre(_m, _a, i=i):
                per_block[-1] = total2.get("bytes", 0)
                per_block.setdefault(i, 0)

            def post(_m, _a, _o, i=i):
                per_block[i] += total2.get("bytes", 0) - per_block[-1]

            hooks += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
        total2: dict[str, int] = {}
        with saved_bytes(total2, weights):
            unet(x, torch.zeros(batch, device=dev), embeds.detach().requires_grad_(),
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.zeros(batch, 6, device=dev, dtype=dtype)})
        for hk in hooks:
            hk.remove()
        out["block_peak"] = max(v for k, v in per_block.items() if k >= 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="data-parallel ranks sharing ZeRO-2 states")
    ap.add_argument("--micro-batch", type=int, default=12, help="images per GPU per forward")
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    ap.add_argument("--chunks", type=int, default=3, help="75-token text chunks per prompt")
    args = ap.parse_args()

    unet, te1, te2 = build(torch.bfloat16)
    counts = {"unet": sum(p.numel() for p in unet.parameters()), "clip_l": sum(p.numel() for p in te1.parameters()),
              "clip_g": sum(p.numel() for p in te2.parameters())}
    P = sum(counts.values())
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f", trainable total {P:,}")
    with flash_like_sdpa():
        acts = {ck: activation_bytes(unet, te1, te2, args.micro_batch, args.size, args.chunks, ck) for ck in (False, True)}
    print(f"activations, micro-batch {args.micro_batch} at {args.size}^2, {args.chunks} text chunks, bf16:")
    print(f"  no checkpointing: {acts[False]['saved'] / GiB:.1f} GiB saved for backward")
    print(f"  checkpointing:    {acts[True]['saved'] / GiB:.1f} GiB saved + {acts[True]['block_peak'] / GiB:.2f} GiB "
          "for the largest resnet / transformer block recomputed in backward")
    from transformers import CLIPTextConfig

    from lumina_illus.models.sdxl import UNetFlops

    fl = UNetFlops(SDXL_UNET, [CLIPTextConfig(**CLIP_L), CLIPTextConfig(**CLIP_G)])
    per_image = fl(args.size // 8, args.size // 8, args.chunks)  # forward + backward, flop_counter on meta
    print(f"training FLOPs per {args.size}^2 image (UNet + both text encoders, fwd+bwd): {per_image / 1e12:.2f} TFLOP; "
          f"H100 bf16 989 TFLOP/s at 40% MFU: {0.4 * 989e12 / per_image:.1f} images/s per GPU")
    bucket = 2 * 5e8  # reduce_bucket_size 5e8 elements of bf16 (configs/deepspeed defaults in train/engine.py)
    for n in args.gpus:
        states = {
            "bf16 weights (replicated)": 2 * P,
            "fp32 master weights / N": 4 * P / n,
            "AdamW m + v (fp32) / N": 8 * P / n,
            "fp32 grad accumulation / N": 4 * P / n,
            "bf16 grads being reduced (bucket)": bucket,
        }
        s = sum(states.values())
        ck = acts[True]["saved"] + acts[True]["block_peak"]
        print(f"ZeRO-2 over {n} GPUs: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in states.items())
              + f" -> states {s / GiB:.1f} GiB; + activations with checkpointing {ck / GiB:.1f} GiB"
              f" = {(s + ck) / GiB:.1f} GiB per GPU (without checkpointing {(s + acts[False]['saved']) / GiB:.1f} GiB)")


if __name__ == "__main__":
    main()
