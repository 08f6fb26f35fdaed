"""Variable-length (packed) attention with two backends giving the same numbers.

A packed batch is one token tensor (N, heads, head_dim) holding S sequences back to back;
`cu_seqlens` (S+1,) int32 are their boundaries. Tokens attend only within their own sequence.

- "flash": `flash_attn_varlen_func` (flash-attn 2) on CUDA for fp16/bf16; handles GQA natively.
- "sdpa": everywhere else. The sequences are scattered into a (S, max_seqlen) padded block with a
  key-padding mask and run through ONE `scaled_dot_product_attention` call (GQA via `enable_gqa`).
  Padding costs only attention work; all other layers stay packed. Measured on CPU against one call
  with a block-diagonal (N, N) mask, which costs O(N^2) memory for the whole pack (bench/model_step.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional speed-up; the SDPA path is the reference it is tested against
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

BACKENDS = ("auto", "flash", "sdpa")


def flash_available(q: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (N, H, hd), k/v: (N, Hkv, hd) with H % Hkv == 0; cu_seqlens: (S+1,) int32 -> (N, H, hd).

    backend: "auto" (flash when usable, else SDPA), "flash" (error if unusable) or "sdpa"."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    use_flash = flash_available(q) if backend == "auto" else backend == "flash"
    if use_flash:
        if not flash_available(q):
            raise RuntimeError("attention backend 'flash' needs flash-attn installed, CUDA and fp16/bf16 inputs")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
    return _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, scale)


def _sdpa_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    n = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]  # (S,)
    n_seq = lens.shape[0]
    seq_id = torch.repeat_interleave(torch.arange(n_seq, device=q.device), lens, output_size=n)  # (N,)
    slot = seq_id * max_seqlen + torch.arange(n, device=q.device) - cu[seq_id]  # (N,) flat padded index

    def pad(x: torch.Tensor) -> torch.Tensor:  # (N, h, hd) -> (S, h, Lmax, hd)
        out = x.new_zeros(n_seq * max_seqlen, *x.shape[1:])
        out = out.index_copy(0, slot, x)
        return out.view(n_seq, max_seqlen, *x.shape[1:]).transpose(1, 2)

    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:  # CUDA's masked (mem-efficient) kernel has no GQA: repeat kv heads (head h -> h // rep)
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    key_mask = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]  # (S, Lmax)
    out = F.scaled_dot_product_attention(
        pad(q),
        pad(k),
        pad(v),
        attn_mask=key_mask[:, None, None, :],  # (S, 1, 1, Lmax): padded keys are never attended
        scale=scale,
        enable_gqa=gqa,
    )  # (S, H, Lmax, hd)
    return out.transpose(1, 2).reshape(n_seq * max_seqlen, *q.shape[1:]).index_select(0, slot)  # (N, H, hd)


def sdpa_block_diagonal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Alternative SDPA formulation kept for the benchmark: the whole pack as one sequence with a
    block-diagonal (N, N) mask. Same result as `varlen_attention(..., backend="sdpa")`."""
    n = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    seq_id = torch.repeat_interleave(torch.arange(cu.shape[0] - 1, device=q.device), cu[1:] - cu[:-1], output_size=n)
    mask = seq_id[:, None] == seq_id[None, :]  # (N, N)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=1.0 / math.sqrt(q.shape[-1]),
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (1, H, N, hd)
    return out[0].transpose(0, 1)  # (N, H, hd)
