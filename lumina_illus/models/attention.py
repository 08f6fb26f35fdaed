"""Variable-length (packed) attention with three backends giving the same numbers.

A packed batch is one token tensor (N, heads, head_dim) holding S sequences back to back;
`cu_seqlens` (S+1,) int32 are their boundaries. Tokens attend only within their own sequence.

- "flash": `flash_attn_varlen_func` (flash-attn 2) on CUDA for fp16/bf16; handles GQA natively.
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10), the FlashAttention varlen
  kernels shipped inside torch, forward and backward, CUDA fp16/bf16 only. Its keyword arguments differ
  between releases (2.10: no `scale`; `enable_gqa` only in later ones), so they are read from its
  signature: GQA uses `enable_gqa` where it exists, else the KV heads are repeated.
- "sdpa": everywhere else. The sequences are scattered into a (S, max_seqlen) padded block with a
  key-padding mask and run through ONE `scaled_dot_product_attention` call (GQA via `enable_gqa`).
  Padding costs only attention work; all other layers stay packed. Measured on CPU against one call
  with a block-diagonal (N, N) mask, which costs O(N^2) memory for the whole pack (bench/model_step.py).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

try:  # optional speed-up; the SDPA path is the reference it is tested against
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn

    TORCH_VARLEN_PARAMS = frozenset(inspect.signature(torch_varlen_attn).parameters)
except ImportError:  # pragma: no cover - depends on the torch version
    torch_varlen_attn, TORCH_VARLEN_PARAMS = None, frozenset()

BACKENDS = ("auto", "flash", "torch_varlen", "sdpa")
_KERNELS = {"flash": lambda: flash_attn_varlen_func, "torch_varlen": lambda: torch_varlen_attn}


def backend_usable(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether concrete `backend` runs on this device and dtype (the varlen kernels: installed, CUDA, fp16/bf16)."""
    if backend == "sdpa":
        return True
    return _KERNELS[backend]() is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend that `backend` names for inputs on `device` in `dtype`: "auto" is flash-attn
    when installed and usable, else torch_varlen, else padded SDPA; any other name is itself."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    return next((b for b in ("flash", "torch_varlen") if backend_usable(b, device, dtype)), "sdpa")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (N, H, hd), k/v: (N, Hkv, hd) with H % Hkv == 0; cu_seqlens: (S+1,) int32 -> (N, H, hd).

    backend: "auto" (see `resolve_backend`), or "flash" / "torch_varlen" (error where unusable) or "sdpa"."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "sdpa":
        return _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, scale)
    if not backend_usable(name, q.device, q.dtype):
        what = "flash-attn installed" if name == "flash" else "torch >= 2.10 (torch.nn.attention.varlen)"
        raise RuntimeError(f"attention backend {name!r} needs {what}, CUDA and fp16/bf16 inputs; "
                           f"got {q.dtype} on {q.device.type} (use 'auto' or 'sdpa')")
    if q.shape[0] == 0:  # a pack of empty sequences (every caption empty): nothing to attend
        return torch.zeros_like(q)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if name == "flash":
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
    return _torch_varlen(q, k, v, cu, max_seqlen, scale)


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    kwargs = {}
    if "scale" in TORCH_VARLEN_PARAMS:  # 2.10 has none; its fixed 1/sqrt(head_dim) is ours
        kwargs["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in TORCH_VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:  # query head h reads kv head h // rep, as enable_gqa and SDPA do
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (N, H, hd)
    return torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)  # (N, H, hd)


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
