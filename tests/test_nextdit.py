"""NextDiT correctness: parity with diffusers' Lumina2Transformer2DModel, packing invariance,
published parameter count, gradients to every trainable parameter, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

from lumina_illus.models.attention import sdpa_block_diagonal, varlen_attention
from lumina_illus.models.checkpoint_io import original_to_diffusers, to_diffusers_config
from lumina_illus.models.nextdit import NextDiT, nextdit_2b, nextdit_tiny

torch.set_num_threads(1)


def random_model(seed: int = 0, **overrides) -> NextDiT:
    """Tiny model with every weight random: the published init zeroes adaLN and the output layer,
    which would make parity and gradient checks trivially pass."""
    torch.manual_seed(seed)
    model = NextDiT(nextdit_tiny(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.uniform_(0.5, 1.5)  # norm weights around 1
            else:
                p.normal_(0.0, 0.15)
    return model


def diffusers_twin(model: NextDiT) -> Lumina2Transformer2DModel:
    cfg = {k: v for k, v in to_diffusers_config(model.config).items() if not k.startswith("_")}
    ref = Lumina2Transformer2DModel(**cfg)
    ref.load_state_dict(original_to_diffusers(model.state_dict(), model.config), strict=True)
    return ref.eval()


def caption_batch(lens: list[int], max_len: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), max_len, dim, generator=g)  # padded positions hold garbage on purpose
    mask = torch.arange(max_len)[None] < torch.tensor(lens)[:, None]
    return feats, mask


def test_parity_with_diffusers_forward_and_input_grad() -> None:
    """Same weights (through our converter), fixed-size batch with padded captions of different
    lengths, fp32. Both models take Lumina's t (0 noise .. 1 data) and return velocity data - noise:
    Lumina2Pipeline passes t = 1 - sigma and negates the output for the scheduler."""
    model = random_model(seed=3)
    ref = diffusers_twin(model)
    x = torch.randn(3, 16, 8, 12, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.1, 0.5, 0.93])
    feats, mask = caption_batch([5, 9, 2], 9, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = model(x1, t, feats, mask)
    theirs = ref(x2, t, feats, mask, return_dict=False)[0]
    assert ours.shape == theirs.shape == x.shape
    assert ours.abs().mean() > 0.1  # a real signal, not a zero-initialised output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # cotangent touching every output
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    assert x1.grad.abs().mean() > 1e-3
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_mixed_resolution_pack_equals_each_sample_alone() -> None:
    model = random_model(seed=5)
    g = torch.Generator().manual_seed(6)
    sizes = [(8, 12), (16, 6), (4, 4), (10, 10)]
    latents = [torch.randn(16, h, w, generator=g) for h, w in sizes]
    t = torch.rand(4, generator=g)
    feats, mask = caption_batch([3, 11, 1, 6], 11, 32)
    packed = model(latents, t, feats, mask)
    assert isinstance(packed, list) and [p.shape for p in packed] == [x.shape for x in latents]
    for i, x in enumerate(latents):
        n = int(mask[i].sum())
        alone = model(x[None], t[i : i + 1], feats[i : i + 1, :n], mask[i : i + 1, :n])[0]
        torch.testing.assert_close(packed[i], alone, rtol=1e-5, atol=1e-5)


def test_2b_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = NextDiT(nextdit_2b())
    assert sum(p.numel() for p in model.parameters()) == 2_609_771_456
    # norm_final is kept but frozen: diffusers' count is the trainable one
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_609_769_152
    with torch.device("meta"):
        ref = Lumina2Transformer2DModel(cap_feat_dim=2304)  # the released config (default is 1024)
    assert sum(p.numel() for p in ref.parameters()) == 2_609_769_152


def test_every_trainable_parameter_gets_a_gradient() -> None:
    model = random_model(seed=7)
    latents = [torch.randn(16, 8, 8), torch.randn(16, 4, 12)]
    feats, mask = caption_batch([4, 6], 6, 32)
    out = model(latents, torch.tensor([0.3, 0.8]), feats, mask)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    assert not model.norm_final.weight.requires_grad and model.norm_final.weight.grad is None


def test_published_init_starts_at_zero_velocity() -> None:
    torch.manual_seed(0)
    model = NextDiT(nextdit_tiny())
    feats, mask = caption_batch([3], 3, 32)
    out = model(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), feats, mask)
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer


def test_activation_checkpointing_same_numbers() -> None:
    model = random_model(seed=8)
    latents = [torch.randn(16, 8, 6), torch.randn(16, 6, 8)]
    feats, mask = caption_batch([5, 2], 5, 32)
    t = torch.tensor([0.4, 0.6])

    def grads() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad()
        out = model(latents, t, feats, mask)
        sum(o.square().sum() for o in out).backward()
        return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    out_plain, g_plain = grads()
    model.set_activation_checkpointing(True)
    out_ckpt, g_ckpt = grads()
    for a, b in zip(out_plain + g_plain, out_ckpt + g_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sdpa_layouts_agree_with_gqa() -> None:
    g = torch.Generator().manual_seed(9)
    cu = torch.tensor([0, 5, 17, 20], dtype=torch.int32)
    q = torch.randn(20, 4, 8, generator=g)
    k, v = torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    padded = varlen_attention(q, k, v, cu, 12, backend="sdpa")
    torch.testing.assert_close(padded, sdpa_block_diagonal(q, k, v, cu), rtol=1e-5, atol=1e-6)
    # one sequence by hand: plain softmax attention with kv heads repeated
    qs, ks, vs = q[5:17].transpose(0, 1), k[5:17].repeat_interleave(2, 1).transpose(0, 1), v[5:17].repeat_interleave(2, 1).transpose(0, 1)
    ref = torch.softmax(qs @ ks.transpose(1, 2) / 8**0.5, -1) @ vs  # (H, L, hd)
    torch.testing.assert_close(padded[5:17], ref.transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_rope_range_error_names_the_axis() -> None:
    model = NextDiT(nextdit_tiny(axes_lens=(300, 4, 512)))
    feats, mask = caption_batch([2], 2, 32)
    with pytest.raises(ValueError, match="patch rows"):
        model(torch.randn(1, 16, 10, 4), torch.tensor([0.5]), feats, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa_on_gpu() -> None:
    pytest.importorskip("flash_attn")
    model = random_model(seed=10).cuda().bfloat16()
    latents = [torch.randn(16, 16, 8, device="cuda", dtype=torch.bfloat16), torch.randn(16, 8, 8, device="cuda", dtype=torch.bfloat16)]
    feats, mask = caption_batch([7, 3], 7, 32)
    feats, mask, t = feats.cuda().bfloat16(), mask.cuda(), torch.tensor([0.2, 0.7], device="cuda")
    flash = model(latents, t, feats, mask)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "sdpa"
    sdpa = model(latents, t, feats, mask)
    for a, b in zip(flash, sdpa):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_bf16_close_to_fp32() -> None:
    """Norms, RoPE and the timestep embedding run in fp32 inside a bf16 model."""
    model = random_model(seed=11)
    latents = [torch.randn(16, 8, 8), torch.randn(16, 4, 12)]
    feats, mask = caption_batch([4, 6], 6, 32)
    t = torch.tensor([0.3, 0.8])
    ref = model(latents, t, feats, mask)
    out = model.to(torch.bfloat16)([x.bfloat16() for x in latents], t, feats.bfloat16(), mask)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).norm() / b.norm() < 0.03


def test_bad_inputs_are_named() -> None:
    model = NextDiT(nextdit_tiny())
    feats, mask = caption_batch([2, 2], 2, 32)
    with pytest.raises(ValueError, match="batch mismatch"):
        model(torch.randn(2, 16, 4, 4), torch.rand(3), feats, mask)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model([torch.randn(16, 4, 4), torch.randn(16, 5, 4)], torch.rand(2), feats, mask)


def test_empty_captions_stay_finite() -> None:
    """A sample with no caption tokens (or a whole batch of them) is a zero-length sequence in the
    context refiner; nothing of it may leak NaNs into outputs or gradients."""
    model = random_model(seed=12)
    feats = torch.randn(2, 3, 32)
    for mask in (torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)):
        model.zero_grad()
        latents = [torch.randn(16, 4, 4, requires_grad=True), torch.randn(16, 4, 6, requires_grad=True)]
        out = model(latents, torch.tensor([0.2, 0.6]), feats, mask)
        sum(o.sum() for o in out).backward()
        assert all(o.isfinite().all() for o in out)
        assert all(x.grad.isfinite().all() for x in latents)
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
