"""3-axis rotary position embedding of Lumina-Image-2.0 (NextDiT), for packed token sequences.

Each token carries three integer coordinates (axis 0: caption index / caption length for image
tokens, axis 1: patch row, axis 2: patch column). Axis i rotates `axes_dims[i]` channels of every
head with frequencies theta^(-2k/d_i). The angles are computed exactly as the original
`NextDiT.precompute_freqs_cis` does (float64 product, then float32 cos/sin), but straight from the
positions instead of through a lookup table, so packed batches need no per-sample gather.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, axes_dims: tuple[int, ...] | list[int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (N, n_axes) integer coordinates -> (cos, sin), each (N, head_dim // 2) float32."""
    if positions.ndim != 2 or positions.shape[1] != len(axes_dims):
        raise ValueError(f"positions must be (N, {len(axes_dims)}), got {tuple(positions.shape)}")
    angles = []
    for axis, d in enumerate(axes_dims):
        # same arithmetic as the original: float64 frequencies and product, rounded to float32
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d))
        angles.append((positions[:, axis].to(torch.float64)[:, None] * inv_freq[None]).float())  # (N, d/2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim/2)
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2k], x[2k+1]) of x: (N, H, head_dim) by the per-token angles
    (cos, sin): (N, head_dim/2). Computed in float32 (bf16 rotations drift), returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (N, H, hd/2, 2)
    re, im = xf[..., 0], xf[..., 1]  # (N, H, hd/2)
    c, s = cos[:, None, :], sin[:, None, :]  # (N, 1, hd/2)
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1)  # (N, H, hd/2, 2): complex product
    return out.flatten(-2).type_as(x)  # (N, H, hd)
