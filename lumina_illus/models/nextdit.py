"""Lumina-Image-2.0 NextDiT for packed variable-length batches.

Same architecture, parameter names and numbers as Alpha-VLLM's `models/model.py` (and diffusers'
`Lumina2Transformer2DModel`), written for training on many resolutions at once: the whole batch
runs as ONE packed token sequence (see packing.py), attention is varlen (attention.py).

    from lumina_illus.models.nextdit import NextDiT, nextdit_2b
    model = NextDiT(nextdit_2b())
    v = model(latents, t, cap_feats, cap_mask)  # latents (B,C,H,W) or list of (C,H,W) -> same structure

Inputs follow Lumina's time convention: t in [0, 1], 0 = pure noise, 1 = clean data; the output is
the velocity (data - noise). Blocks appear in reading order: timestep embedder, norms, attention,
feed-forward, transformer block, final layer, NextDiT, presets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lumina_illus.config import check, checkpointed_blocks, normalize_checkpointing
from lumina_illus.models.attention import BACKENDS, varlen_attention
from lumina_illus.models.packing import PackPlan, Segments, patchify, plan_packing, unpatchify
from lumina_illus.models.rope import apply_rope, rope_cos_sin


@dataclass
class NextDiTConfig:
    """Architecture of a NextDiT; defaults are the public 2.6B Lumina-Image-2.0 model. Plain types only:
    this is stored in run configs (`model.arch`) and checkpoint metadata."""

    patch_size: int = 2  # latent pixels per patch side
    in_channels: int = 16  # latent channels (Flux VAE: 16)
    dim: int = 2304  # hidden size
    n_layers: int = 26  # main joint (caption + image) layers
    n_refiner_layers: int = 2  # noise refiner (image only, adaLN) and context refiner (caption only) layers
    n_heads: int = 24  # query heads
    n_kv_heads: int = 8  # key/value heads (GQA)
    multiple_of: int = 256  # FFN hidden = multiple_of * ceil(int(ffn_dim_multiplier * 4 * dim) / multiple_of)
    ffn_dim_multiplier: float | None = None  # None: 4 * dim before rounding
    norm_eps: float = 1e-5  # RMSNorm epsilon (block norms, caption norm)
    cap_feat_dim: int = 2304  # caption feature size (Gemma-2-2B hidden_states[-2])
    axes_dims: tuple[int, int, int] = (32, 32, 32)  # RoPE channels per axis (caption idx, row, col); sum = head_dim
    axes_lens: tuple[int, int, int] = (300, 512, 512)  # largest position per axis (the original's RoPE tables)
    rope_theta: float = 10000.0
    # the two runtime fields below change how the model runs, not what it is
    attention: str = "auto"  # "auto" (CUDA: flash-attn, else torch_varlen, else SDPA) | "flash" | "torch_varlen" | "sdpa"
    # recompute blocks in backward (torch.utils.checkpoint): false | true | fraction | "every_K" (config.checkpointed_blocks)
    activation_checkpointing: bool | float | str = False

    def __post_init__(self) -> None:
        self.axes_dims = tuple(self.axes_dims)
        self.axes_lens = tuple(self.axes_lens)
        check(self.dim % self.n_heads == 0, "dim", f"{self.dim} must be divisible by n_heads {self.n_heads}")
        check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"{self.n_kv_heads} must divide n_heads {self.n_heads}")
        check(
            sum(self.axes_dims) == self.head_dim and all(d % 2 == 0 for d in self.axes_dims),
            "axes_dims",
            f"{list(self.axes_dims)} must be even and sum to head_dim {self.head_dim}",
        )
        check(self.attention in BACKENDS, "attention", f"{self.attention!r} must be one of {list(BACKENDS)}")
        normalize_checkpointing(self.activation_checkpointing)  # raises naming the key
        for name in ("patch_size", "in_channels", "n_layers", "multiple_of", "cap_feat_dim"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.n_refiner_layers >= 0, "n_refiner_layers", "must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:  # width of the timestep embedding that drives adaLN
        return min(self.dim, 1024)

    @property
    def ffn_hidden(self) -> int:
        hidden = 4 * self.dim
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims"], d["axes_lens"] = list(self.axes_dims), list(self.axes_lens)
        return d


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (cos, sin; 256) -> MLP -> adaLN input. Lumina-2 feeds t unscaled."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, hidden)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (bf16-safe), then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class JointAttention(nn.Module):
    """GQA self-attention over packed sequences with qk RMSNorm (eps 1e-5) and 3-axis RoPE."""

    def __init__(self, cfg: NextDiTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attention
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-5)
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-5)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqs: Segments) -> torch.Tensor:
        n = x.shape[0]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)  # (N, H*hd), (N, Hkv*hd) x2
        q = self.q_norm(q.view(n, self.n_heads, self.head_dim))  # (N, H, hd)
        k = self.k_norm(k.view(n, self.n_kv_heads, self.head_dim))  # (N, Hkv, hd)
        v = v.view(n, self.n_kv_heads, self.head_dim)  # (N, Hkv, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, self.backend)  # (N, H, hd)
        return self.out(o.reshape(n, q_dim))  # (N, D)


class FeedForward(nn.Module):
    """SwiGLU without bias: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    """Sandwich-normed attention + FFN; with `modulation`, adaLN scales the inputs from t and tanh
    gates the residual branches (noise refiner and main layers); without it (context refiner), plain."""

    def __init__(self, cfg: NextDiTConfig, modulation: bool) -> None:
        super().__init__()
        self.attention = JointAttention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.modulation = modulation
        self.recompute = False  # activation checkpointing of this block (NextDiT.set_activation_checkpointing)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(
        self,
        x: torch.Tensor,  # (N, D) packed tokens
        rope: tuple[torch.Tensor, torch.Tensor],  # (N, hd/2) cos, sin
        seqs: Segments,
        adaln: torch.Tensor | None = None,  # (B, adaln_dim) timestep embedding per sample
    ) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, seqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).chunk(4, dim=-1)  # (B, D) each
        # 1 + scale and tanh(gate) once per sample, then one gather to tokens
        mod = torch.cat([1 + scale_msa, gate_msa.tanh(), 1 + scale_mlp, gate_mlp.tanh()], dim=-1)  # (B, 4D)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.index_select(0, seqs.sample_id).chunk(4, dim=-1)  # (N, D)
        x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, rope, seqs))
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm (eps 1e-6), adaLN scale from t, linear to patch pixels."""

    def __init__(self, cfg: NextDiTConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor, sample_id: torch.Tensor) -> torch.Tensor:
        scale = (1 + self.adaLN_modulation(adaln)).index_select(0, sample_id)  # (N, D)
        x = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6).type_as(x) * scale
        return self.linear(x)  # (N, p*p*C)


class NextDiT(nn.Module):
    def __init__(self, cfg: NextDiTConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.x_embedder = nn.Linear(cfg.patch_size**2 * cfg.in_channels, d)
        self.noise_refiner = nn.ModuleList(JointTransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(JointTransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, d))
        self.layers = nn.ModuleList(JointTransformerBlock(cfg, True) for _ in range(cfg.n_layers))
        # present in the released checkpoints but unused in forward: kept frozen so that original and
        # ComfyUI files round-trip with every key and the parameter count is the published one
        self.norm_final = RMSNorm(d, eps=cfg.norm_eps)
        self.norm_final.weight.requires_grad_(False)
        self.final_layer = FinalLayer(cfg)
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original initialisation: xavier linears, N(0, 0.02) timestep MLP, zero adaLN and final
        projection (every block starts as the identity and the output as zero)."""
        if self.x_embedder.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.trunc_normal_(self.cap_embedder[1].weight, std=0.02)
        for block in [*self.noise_refiner, *self.layers]:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (self.final_layer.linear, self.final_layer.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def blocks(self) -> list[JointTransformerBlock]:
        """Every transformer block in forward order: context refiner, noise refiner, main layers."""
        return [*self.context_refiner, *self.noise_refiner, *self.layers]

    def set_activation_checkpointing(self, spec: bool | float | str) -> None:
        """Recompute blocks during backward instead of keeping their activations: True every block
        (~+33% compute), a fraction or "every_K" a subset (lumina_illus.config.checkpointed_blocks)."""
        for block, on in zip(self.blocks(), checkpointed_blocks(spec, len(self.blocks()))):
            block.recompute = on
        self.config.activation_checkpointing = normalize_checkpointing(spec)

    def set_attention_backend(self, backend: str) -> None:
        """Attention backend of every block (attention.BACKENDS); "auto" picks per call."""
        check(backend in BACKENDS, "attention", f"{backend!r} must be one of {list(BACKENDS)}")
        for block in self.blocks():
            block.attention.backend = backend
        self.config.attention = backend

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each transformer block in place (as torchtitan does; parameter names unchanged)
        with dynamic shapes: packed batches change the token count, sequence count and longest
        sequence every step, which must not recompile every step (only sizes 0 and 1 specialise:
        a pack of one sample, captions of one token). `backend`: torch.compile's."""
        for block in self.blocks():
            block.compile(dynamic=True, backend=backend)

    def _block(self, block: JointTransformerBlock, *args: Any) -> torch.Tensor:
        if block.recompute and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        latents: torch.Tensor | list[torch.Tensor],  # (B, C, H, W) or B x (C, H_b, W_b): noisy latents x_t
        t: torch.Tensor,  # (B,) in [0, 1]: 0 = noise, 1 = data
        cap_feats: torch.Tensor,  # (B, L, cap_feat_dim) caption features, right padded
        cap_mask: torch.Tensor,  # (B, L) bool, True on real caption tokens
    ) -> torch.Tensor | list[torch.Tensor]:
        """Velocity (data - noise) for every sample, in the same structure as `latents`."""
        cfg = self.config
        bsz = len(latents)
        if t.shape != (bsz,) or cap_feats.shape[0] != bsz or cap_mask.shape != cap_feats.shape[:2]:
            raise ValueError(
                f"batch mismatch: {bsz} latents, t {tuple(t.shape)}, cap_feats {tuple(cap_feats.shape)}, "
                f"cap_mask {tuple(cap_mask.shape)}"
            )
        cap_mask = cap_mask.bool()
        img_tokens, grids = patchify(latents, cfg.patch_size)  # (Nimg, p*p*C)
        plan = plan_packing(cap_mask.sum(1).tolist(), grids, device=img_tokens.device)
        self._check_positions(plan)

        adaln = self.t_embedder(t)  # (B, adaln_dim)
        cap = self.cap_embedder(cap_feats[cap_mask])  # (Ncap, D): only real caption tokens
        img = self.x_embedder(img_tokens)  # (Nimg, D)
        cap_rope = rope_cos_sin(plan.cap_pos, cfg.axes_dims, cfg.rope_theta)  # (Ncap, hd/2) x2
        img_rope = rope_cos_sin(plan.img_pos, cfg.axes_dims, cfg.rope_theta)  # (Nimg, hd/2) x2
        joint_rope = tuple(torch.cat(ab).index_select(0, plan.joint_index) for ab in zip(cap_rope, img_rope))

        for block in self.context_refiner:
            cap = self._block(block, cap, cap_rope, plan.caption)
        for block in self.noise_refiner:
            img = self._block(block, img, img_rope, plan.image, adaln)
        x = torch.cat([cap, img]).index_select(0, plan.joint_index)  # (N, D): [cap_b ; img_b] per sample
        for block in self.layers:
            x = self._block(block, x, joint_rope, plan.joint, adaln)

        x = x.index_select(0, plan.img_in_joint)  # (Nimg, D): only image tokens are predicted
        out = self.final_layer(x, adaln, plan.image.sample_id)  # (Nimg, p*p*C)
        images = unpatchify(out, grids, cfg.patch_size)  # B x (C, H, W)
        return torch.stack(images) if isinstance(latents, torch.Tensor) else images

    def _check_positions(self, plan: PackPlan) -> None:
        cfg = self.config
        limits = (max(plan.cap_lens, default=0), max(h for h, _ in plan.grid_sizes), max(w for _, w in plan.grid_sizes))
        for axis, (need, have) in enumerate(zip(limits, cfg.axes_lens)):
            if need > have - (axis == 0):  # image tokens sit at caption position cap_len on axis 0
                what = ("caption tokens", "patch rows", "patch columns")[axis]
                raise ValueError(f"{need} {what} exceed the RoPE range axes_lens[{axis}] = {have}")

    def flops(self, img_tokens: int, cap_tokens: int) -> float:
        """Analytic forward FLOPs of one sample (matmuls and attention; 2 FLOPs per multiply-add).
        Training (forward + backward) is 3x this; activation checkpointing adds one more forward."""
        cfg = self.config
        d, hd = cfg.dim, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
        per_token = 2 * (d * qkv_out + cfg.n_heads * hd * d + 3 * d * cfg.ffn_hidden)  # linears of one block

        def block(tokens: int, modulated: bool) -> float:
            attn = 4 * tokens * tokens * cfg.n_heads * hd  # Q K^T and P V
            return tokens * per_token + attn + (2 * cfg.adaln_dim * 4 * d if modulated else 0)

        seq = img_tokens + cap_tokens
        total = cfg.n_refiner_layers * (block(cap_tokens, False) + block(img_tokens, True))
        total += cfg.n_layers * block(seq, True)
        p2c = cfg.patch_size**2 * cfg.in_channels
        total += 2 * img_tokens * p2c * d * 2  # x_embedder and final projection
        total += 2 * cap_tokens * cfg.cap_feat_dim * d  # caption embedder
        total += 2 * (256 * cfg.adaln_dim + cfg.adaln_dim**2) + 2 * cfg.adaln_dim * d  # t MLP, final adaLN
        return float(total)


# presets


def nextdit_2b(**overrides: Any) -> NextDiTConfig:
    """Lumina-Image-2.0: 2,609,771,456 parameters (incl. the unused norm_final)."""
    return NextDiTConfig(**overrides)


def nextdit_tiny(**overrides: Any) -> NextDiTConfig:
    """A few-hundred-thousand-parameter model with every architectural feature, for tests and toy runs."""
    base: dict[str, Any] = dict(
        dim=96,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=32,
        cap_feat_dim=32,
        axes_dims=(8, 8, 8),
        in_channels=16,
    )
    base.update(overrides)
    return NextDiTConfig(**base)
