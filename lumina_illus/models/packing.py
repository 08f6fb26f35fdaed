"""Pure functions that pack a batch of (caption, image) samples of different sizes into one token
sequence batch, and cut the model output back into images.

Per sample b the NextDiT sees three sequences:
  caption  (context refiner):  cap_len[b] tokens
  image    (noise refiner):    h[b] * w[b] patch tokens (row-major)
  joint    (main layers):      [caption ; image]
All three are stored packed (samples back to back, no padding) with `cu_seqlens` boundaries.
Position ids follow Lumina-Image-2.0: caption token j -> (j, 0, 0); image token at patch (r, c)
-> (cap_len, r, c). The joint sequence is `cat([caption tokens, image tokens])[joint_index]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    """Boundaries of packed sequences."""

    cu_seqlens: torch.Tensor  # (S+1,) int32 offsets of each sequence in the packed tensor
    max_seqlen: int  # longest sequence, for the attention kernels
    sample_id: torch.Tensor  # (N,) long: which sample each token belongs to (adaLN lookup)


@dataclass
class PackPlan:
    """Everything the model needs to run one packed batch; built once per forward."""

    cap_lens: list[int]  # caption tokens of each sample
    grid_sizes: list[tuple[int, int]]  # (h, w) patch grid of each sample
    caption: Segments
    image: Segments
    joint: Segments
    cap_pos: torch.Tensor  # (Ncap, 3) int RoPE coordinates of caption tokens
    img_pos: torch.Tensor  # (Nimg, 3) int RoPE coordinates of image tokens
    joint_index: torch.Tensor  # (Ncap+Nimg,) long: joint token i = cat([cap, img])[joint_index[i]]
    img_in_joint: torch.Tensor  # (Nimg,) long: where each image token sits in the joint sequence


def _segments(lens: torch.Tensor, device: torch.device) -> Segments:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    sample_id = torch.repeat_interleave(torch.arange(len(lens)), lens)
    return Segments(cu.to(device), int(lens.max()) if len(lens) else 0, sample_id.to(device))


def plan_packing(
    cap_lens: list[int], grid_sizes: list[tuple[int, int]], device: torch.device | str = "cpu"
) -> PackPlan:
    """Index plan for samples with `cap_lens[b]` caption tokens and an (h, w) patch grid each."""
    if len(cap_lens) != len(grid_sizes):
        raise ValueError(f"{len(cap_lens)} captions for {len(grid_sizes)} images")
    if any(c < 0 for c in cap_lens) or any(h <= 0 or w <= 0 for h, w in grid_sizes):
        raise ValueError(f"bad sizes: cap_lens={cap_lens}, grid_sizes={grid_sizes}")
    device = torch.device(device)
    cap = torch.tensor(cap_lens, dtype=torch.long)  # (B,)
    hs = torch.tensor([h for h, _ in grid_sizes], dtype=torch.long)  # (B,)
    ws = torch.tensor([w for _, w in grid_sizes], dtype=torch.long)  # (B,)
    img = hs * ws  # (B,)
    n_cap, n_img = int(cap.sum()), int(img.sum())

    caption, image, joint = _segments(cap, device), _segments(img, device), _segments(cap + img, device)
    cap_start = torch.cumsum(cap, 0) - cap  # (B,) exclusive prefix sums
    img_start = torch.cumsum(img, 0) - img
    joint_start = torch.cumsum(cap + img, 0) - cap - img

    cap_b = caption.sample_id.cpu()  # (Ncap,)
    cap_j = torch.arange(n_cap) - cap_start[cap_b]  # (Ncap,) index within its caption
    img_b = image.sample_id.cpu()  # (Nimg,)
    local = torch.arange(n_img) - img_start[img_b]  # (Nimg,) row-major patch index
    row, col = local // ws[img_b], local % ws[img_b]

    cap_pos = torch.stack((cap_j, torch.zeros_like(cap_j), torch.zeros_like(cap_j)), dim=1)  # (Ncap, 3)
    img_pos = torch.stack((cap[img_b], row, col), dim=1)  # (Nimg, 3)

    cap_in_joint = joint_start[cap_b] + cap_j  # (Ncap,)
    img_in_joint = joint_start[img_b] + cap[img_b] + local  # (Nimg,)
    joint_index = torch.empty(n_cap + n_img, dtype=torch.long)
    joint_index[cap_in_joint] = torch.arange(n_cap)
    joint_index[img_in_joint] = n_cap + torch.arange(n_img)

    return PackPlan(
        cap_lens=list(cap_lens),
        grid_sizes=list(grid_sizes),
        caption=caption,
        image=image,
        joint=joint,
        cap_pos=cap_pos.to(device),
        img_pos=img_pos.to(device),
        joint_index=joint_index.to(device),
        img_in_joint=img_in_joint.to(device),
    )


def patchify(latents: torch.Tensor | list[torch.Tensor], patch: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(B, C, H, W) or list of (C, H, W) -> packed patches (Nimg, patch*patch*C) in (ph, pw, C) order,
    and each sample's (h, w) patch grid."""
    if isinstance(latents, torch.Tensor):
        b, c, hh, ww = latents.shape
        _check_divisible(hh, ww, patch)
        h, w = hh // patch, ww // patch
        x = latents.view(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, ph, pw, C)
        return x.reshape(b * h * w, patch * patch * c), [(h, w)] * b
    tokens, grids = [], []
    for x in latents:  # view + permute per sample: cheap, no compute; all math below is packed
        c, hh, ww = x.shape
        _check_divisible(hh, ww, patch)
        h, w = hh // patch, ww // patch
        tokens.append(x.view(c, h, patch, w, patch).permute(1, 3, 2, 4, 0).reshape(h * w, -1))  # (h*w, p*p*C)
        grids.append((h, w))
    return torch.cat(tokens, dim=0), grids


def unpatchify(tokens: torch.Tensor, grid_sizes: list[tuple[int, int]], patch: int) -> list[torch.Tensor]:
    """Packed (Nimg, patch*patch*C) -> list of (C, h*patch, w*patch), inverse of `patchify`."""
    out = []
    for x, (h, w) in zip(torch.split(tokens, [h * w for h, w in grid_sizes]), grid_sizes):
        x = x.view(h, w, patch, patch, -1).permute(4, 0, 2, 1, 3)  # (C, h, ph, w, pw)
        out.append(x.reshape(x.shape[0], h * patch, w * patch))
    return out


def _check_divisible(hh: int, ww: int, patch: int) -> None:
    if hh % patch or ww % patch:
        raise ValueError(f"latent size {hh}x{ww} is not divisible by the patch size {patch}")
