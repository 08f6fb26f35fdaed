"""Packing plan, patchify and RoPE against hand-written expectations and diffusers' Lumina2 code."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

from lumina_illus.models.packing import patchify, plan_packing, unpatchify
from lumina_illus.models.rope import apply_rope, rope_cos_sin

torch.set_num_threads(1)


def test_plan_by_hand() -> None:
    # sample 0: 2 caption tokens, 1x2 grid; sample 1: 1 caption token, 2x1 grid
    plan = plan_packing([2, 1], [(1, 2), (2, 1)])
    assert plan.caption.cu_seqlens.tolist() == [0, 2, 3]
    assert plan.image.cu_seqlens.tolist() == [0, 2, 4]
    assert plan.joint.cu_seqlens.tolist() == [0, 4, 7]
    assert (plan.caption.max_seqlen, plan.image.max_seqlen, plan.joint.max_seqlen) == (2, 2, 4)
    assert plan.joint.sample_id.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert plan.cap_pos.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert plan.img_pos.tolist() == [[2, 0, 0], [2, 0, 1], [1, 0, 0], [1, 1, 0]]
    # cat([cap0, cap0', cap1, img0, img0', img1, img1']) reordered to [cap0 cap0' img0 img0' | cap1 img1 img1']
    assert plan.joint_index.tolist() == [0, 1, 3, 4, 2, 5, 6]
    assert plan.img_in_joint.tolist() == [2, 3, 5, 6]


def test_plan_without_caption_tokens() -> None:
    plan = plan_packing([0, 3], [(2, 2), (1, 1)])
    assert plan.joint.cu_seqlens.tolist() == [0, 4, 8]
    assert plan.img_pos[:4, 0].tolist() == [0, 0, 0, 0]


def test_patchify_round_trip_and_order() -> None:
    xs = [torch.randn(16, 4, 6), torch.randn(16, 8, 2)]
    tokens, grids = patchify(xs, 2)
    assert tokens.shape == (2 * 3 + 4 * 1, 64) and grids == [(2, 3), (4, 1)]
    # token (row 1, col 2) of sample 0 holds pixels [2:4, 4:6] in (ph, pw, C) order
    expected = xs[0][:, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(tokens[1 * 3 + 2], expected, rtol=0, atol=0)
    back = unpatchify(tokens, grids, 2)
    assert all(torch.equal(a, b) for a, b in zip(back, xs))
    batch = torch.randn(3, 16, 6, 4)
    tokens_b, _ = patchify(batch, 2)
    tokens_l, _ = patchify(list(batch), 2)
    assert torch.equal(tokens_b, tokens_l)


def test_positions_rope_and_patches_match_diffusers() -> None:
    """diffusers' Lumina2RotaryPosEmbed gives the padded per-sample freqs and patches; ours are packed."""
    axes = (8, 8, 8)
    ref = Lumina2RotaryPosEmbed(theta=10000, axes_dim=list(axes), axes_lens=[300, 512, 512], patch_size=2)
    latents = torch.randn(2, 16, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    patches, cap_freqs, img_freqs, joint_freqs, cap_lens, seq_lens = ref(latents, mask)

    tokens, grids = patchify(latents, 2)
    torch.testing.assert_close(tokens, patches.flatten(0, 1), rtol=0, atol=0)
    plan = plan_packing(mask.sum(1).tolist(), grids)
    cos, sin = rope_cos_sin(torch.cat([plan.cap_pos, plan.img_pos]).index_select(0, plan.joint_index), axes, 10000.0)
    expected = torch.cat([joint_freqs[b, :n] for b, n in enumerate(seq_lens)])  # complex (N, hd/2)
    torch.testing.assert_close(cos, expected.real.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected.imag.float(), rtol=0, atol=1e-6)


def test_apply_rope_is_complex_rotation() -> None:
    x = torch.randn(5, 3, 12)
    cos, sin = rope_cos_sin(torch.randint(0, 50, (5, 3)), (4, 4, 4), 10000.0)
    z = torch.view_as_complex(x.reshape(5, 3, 6, 2)) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.view_as_real(z).flatten(-2), rtol=1e-6, atol=1e-6)
    bf = apply_rope(x.bfloat16(), cos, sin)
    assert bf.dtype == torch.bfloat16
