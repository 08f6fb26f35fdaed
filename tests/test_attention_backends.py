"""Attention backends: which one `auto` picks, the `torch_varlen` path (torch.nn.attention.varlen) against
padded SDPA, GQA by `enable_gqa` and by repeated KV heads, and the resolved backend in the run config.

FlashAttention has no CPU kernel, so on CPU the real `torch.nn.attention.varlen.varlen_attn` (its argument
checks, custom op and autograd registration) runs over a reference kernel registered for
`aten::_flash_attention_forward/backward` on CPU: what is tested here is our call (cu_seqlens, lengths,
scale, head layout, GQA), not the kernel's numerics; those are the `gpu` tests at the bottom.
"""

from __future__ import annotations

import math

import pytest
import torch

from lumina_illus.config import config_from_raw, to_dict
from lumina_illus.families import get_family
from lumina_illus.models import attention
from lumina_illus.models.attention import resolve_backend, varlen_attention
from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

torch.set_num_threads(1)
needs_torch_varlen = pytest.mark.skipif(attention.torch_varlen_attn is None, reason="torch < 2.10")


def _ref_attention(q, k, v, cu, scale):
    """Per-sequence softmax attention, KV head h // rep for query head h: (out (N, H, hd), lse (H, N))."""
    rep = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)  # (H, L, hd)
        ks, vs = (x[a:b].repeat_interleave(rep, 1).transpose(0, 1) for x in (k, v))
        s = qs @ ks.transpose(1, 2) * scale  # (H, L, L)
        lses.append(torch.logsumexp(s, -1))
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, 1)


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                   *, scale=None, **_):
    assert cum_seq_q.dtype == torch.int32 and cum_seq_q is cum_seq_k and not is_causal and dropout_p == 0
    lens = (cum_seq_q[1:] - cum_seq_q[:-1]).tolist()
    assert max_q == max_k == max(lens) and cum_seq_q[-1] == query.shape[0]  # what the kernel sizes its grid by
    out, lse = _ref_attention(query, key, value, cum_seq_q, scale if scale is not None else query.shape[-1] ** -0.5)
    empty = torch.empty(0)
    return out, lse, torch.zeros(2, dtype=torch.uint64), empty, empty


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, rng_state, unused, *, scale=None, **_):
    """Softmax attention backward by hand (autograd is off below the autograd dispatch key)."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    hkv, rep = key.shape[1], query.shape[1] // key.shape[1]
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for a, b in zip(cum_seq_q[:-1].tolist(), cum_seq_q[1:].tolist()):
        q, do = query[a:b].transpose(0, 1), grad_out[a:b].transpose(0, 1)  # (H, L, hd)
        k, v = (x[a:b].repeat_interleave(rep, 1).transpose(0, 1) for x in (key, value))
        p = torch.softmax(q @ k.transpose(1, 2) * scale, -1)  # (H, L, L)
        dp = do @ v.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[a:b] = (ds @ k * scale).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ q * scale).view(hkv, rep, b - a, key.shape[-1]).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ do).view(hkv, rep, b - a, key.shape[-1]).sum(1).transpose(0, 1)
    return dq, dk, dv


@pytest.fixture
def cpu_flash(monkeypatch):
    """The reference kernel as FlashAttention's CPU implementation, and torch_varlen usable on CPU."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", _flash_forward, "CPU")
    lib.impl("_flash_attention_backward", _flash_backward, "CPU")
    monkeypatch.setattr(attention, "backend_usable", lambda backend, device, dtype: True)
    yield
    lib._destroy()


def _qkv(lens, heads=4, kv_heads=2, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(n, heads, hd, generator=g)
    k, v = torch.randn(n, kv_heads, hd, generator=g), torch.randn(n, kv_heads, hd, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_auto_picks_flash_then_torch_varlen_then_sdpa(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_varlen_func", object())
    monkeypatch.setattr(attention, "torch_varlen_attn", object())
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "flash"
    assert resolve_backend("auto", "cuda", torch.float16) == "flash"
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"  # both kernels are fp16/bf16 only
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)  # flash-attn not installed
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "torch_varlen"
    monkeypatch.setattr(attention, "torch_varlen_attn", None)  # torch < 2.10
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"
    for name in ("flash", "torch_varlen", "sdpa"):  # a named backend is never swapped for another
        assert resolve_backend(name, "cpu", torch.float32) == name
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("xformers", "cpu", torch.float32)


def test_named_kernel_backend_refuses_cpu_fp32():
    q, k, v, cu = _qkv([3, 5])
    for name in ("flash", "torch_varlen"):
        with pytest.raises(RuntimeError, match=f"'{name}' needs .*CUDA and fp16/bf16.*float32 on cpu"):
            varlen_attention(q, k, v, cu, 5, backend=name)


@needs_torch_varlen
@pytest.mark.parametrize("gqa_flag", [True, False], ids=["enable_gqa", "repeat_kv"])
def test_torch_varlen_path_matches_padded_sdpa(cpu_flash, monkeypatch, gqa_flag):
    """Mixed lengths (one of a single token), GQA 4/2, forward and backward. Without `enable_gqa` in the
    installed signature (torch 2.10/2.11) the KV heads are repeated: the real varlen_attn rejects
    unequal head counts without the flag, so a missing repeat fails here."""
    assert "enable_gqa" in attention.TORCH_VARLEN_PARAMS  # the installed torch has it: test both paths
    if not gqa_flag:
        monkeypatch.setattr(attention, "TORCH_VARLEN_PARAMS", attention.TORCH_VARLEN_PARAMS - {"enable_gqa"})
    lens = [7, 1, 12, 4]
    q, k, v, cu = _qkv(lens, hd=12, seed=1)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("torch_varlen", "sdpa"):
        qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = varlen_attention(*qkv, cu, max(lens), backend=backend)
        (out * w).sum().backward()
        results.append([out.detach(), *(x.grad for x in qkv)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref, _ = _ref_attention(q, k, v, cu, 1 / math.sqrt(12))
    torch.testing.assert_close(results[0][0], ref, rtol=1e-5, atol=1e-6)


@needs_torch_varlen
def test_nextdit_torch_varlen_equals_sdpa_with_empty_caption(cpu_flash):
    """The whole model: caption, image and joint packs through torch_varlen, one sample with no caption
    (a zero-length sequence), parameter gradients included."""
    torch.manual_seed(0)
    model = NextDiT(nextdit_tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(16, 8, 6, generator=g), torch.randn(16, 4, 10, generator=g), torch.randn(16, 6, 6, generator=g)]
    feats = torch.randn(3, 5, 32, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 0, 2])[:, None]
    t = torch.tensor([0.2, 0.5, 0.9])
    runs = []
    for backend in ("torch_varlen", "sdpa"):
        model.set_attention_backend(backend)
        model.zero_grad()
        out = model(latents, t, feats, mask)
        sum(o.square().sum() for o in out).backward()
        runs.append([*out, *(p.grad.clone() for p in model.parameters() if p.requires_grad)])
    for a, b in zip(*runs):  # fp32 sums in another order through 4 blocks: relative error ~1e-6
        assert (a - b).norm() <= 1e-5 * b.norm(), (a - b).norm() / b.norm()


def test_build_training_resolves_auto_into_the_run_config(tmp_path, monkeypatch, capsys):
    """The backend that runs is written into cfg (config.yaml and the W&B config are `to_dict(cfg)`),
    set on every block, and printed once at start."""
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    raw = {
        "family": "lumina2",
        "model": {"arch": {"preset": "tiny"}, "text_encoder": {"path": str(make_tiny_gemma2(tmp_path / "g", ["a b"]))},
                  "vae": {"path": str(make_tiny_flux_vae(tmp_path / "v"))}},
        "train": {"precision": "fp32", "activation_checkpointing": "every_2"},
    }
    cfg = config_from_raw(raw, "t.yaml")
    dit = get_family("lumina2").build_training(cfg, torch.device("cpu")).module.dit
    assert to_dict(cfg)["model"]["arch"]["attention"] == "sdpa"  # CPU fp32
    assert {b.attention.backend for b in dit.blocks()} == {"sdpa"}
    assert [b.recompute for b in dit.blocks()] == [True, False, True, False]
    assert "attention backend sdpa (asked: auto), activation checkpointing 2/4 blocks" in capsys.readouterr().out

    # where torch_varlen runs (CUDA bf16 without flash-attn), auto names it
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "backend_usable", lambda backend, device, dtype: backend != "flash")
    cfg = config_from_raw({**raw, "train": {"precision": "bf16"}}, "t.yaml")
    dit = get_family("lumina2").build_training(cfg, torch.device("cpu")).module.dit
    assert to_dict(cfg)["model"]["arch"]["attention"] == "torch_varlen"
    assert {b.attention.backend for b in dit.blocks()} == {"torch_varlen"}


# -- the real kernels (CUDA) ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or attention.torch_varlen_attn is None,
                    reason="needs CUDA and torch >= 2.10")
@pytest.mark.parametrize("gqa_flag", [True, False], ids=["enable_gqa", "repeat_kv"])
def test_torch_varlen_kernel_matches_sdpa_bf16(monkeypatch, gqa_flag):
    if not gqa_flag:
        monkeypatch.setattr(attention, "TORCH_VARLEN_PARAMS", attention.TORCH_VARLEN_PARAMS - {"enable_gqa"})
    lens = [300, 17, 1024, 96]
    q, k, v, cu = _qkv(lens, heads=24, kv_heads=8, hd=96, seed=4)
    q, k, v, cu = (x.cuda() for x in (q, k, v, cu))
    w = torch.randn_like(q)
    results = []
    for backend in ("torch_varlen", "sdpa"):
        qkv = [x.bfloat16().requires_grad_(True) for x in (q, k, v)]
        out = varlen_attention(*qkv, cu, max(lens), backend=backend)
        (out.float() * w).sum().backward()
        results.append([out.detach(), *(x.grad for x in qkv)])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
