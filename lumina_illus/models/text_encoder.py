"""Gemma-2 caption encoder of Lumina-2: system prompt + caption -> penultimate hidden states.

    enc = GemmaTextEncoder(TextEncoderConfig(path="/models/gemma-2-2b"), device=torch.device("cuda"))
    feats, mask = enc.encode(["1girl, red hair", ""])   # (B, L, 2304), (B, L) bool, right padded

Each caption becomes `system_prompt + " <Prompt Start> " + caption`, exactly as diffusers'
`Lumina2Pipeline.encode_prompt` and the official sampler build it, so an empty caption (caption
dropout, the negative prompt) still carries the system prompt. diffusers templates prompts but
not negative prompts: give it `negative_prompt=build_prompt(neg, system_prompt)` to reproduce ours. Features are `hidden_states[layer]`
(-2 by default). Frozen by default: eval mode, no gradients, outside the optimizer; set
`trainable: true` to fine-tune it with its own learning rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lumina_illus.config import check
from lumina_illus.models.vae import torch_dtype

# The published default of Lumina-Image-2.0 (diffusers Lumina2Pipeline.system_prompt).
LUMINA_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)


@dataclass
class TextEncoderConfig:
    path: str | None = None  # local folder of a Gemma-2 model + tokenizer (AutoModel / AutoTokenizer)
    system_prompt: str = LUMINA_SYSTEM_PROMPT  # prefix of every caption; "" disables the template
    max_tokens: int = 256  # tokens per caption incl. system prompt (truncated beyond)
    layer: int = -2  # index into hidden_states (embeddings are 0, the final-norm output is -1)
    trainable: bool = False  # fine-tune the encoder together with the DiT
    lr: float | None = None  # its learning rate when trainable (None: optim.text_encoder_lr; one is required)
    dtype: str = "bf16"  # weights/compute dtype on GPU; CPU always runs fp32

    def __post_init__(self) -> None:
        check(self.max_tokens > 0, "max_tokens", "must be > 0")
        check(self.dtype in ("fp32", "bf16", "fp16"), "dtype", "must be fp32, bf16 or fp16")
        check(self.lr is None or self.lr > 0, "lr", "must be > 0")


def build_prompt(caption: str, system_prompt: str) -> str:
    """The text Gemma sees for one caption (Lumina's template)."""
    return f"{system_prompt} <Prompt Start> {caption}" if system_prompt else caption


class GemmaTextEncoder(nn.Module):
    """Tokenizer + Gemma-2 model; `encode` returns right-padded features and a boolean mask."""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not cfg.path:
            raise ValueError("text_encoder.path: no Gemma-2 path configured (a local transformers folder)")
        if not (Path(cfg.path) / "config.json").is_file():
            raise FileNotFoundError(f"text_encoder.path: {cfg.path} has no config.json (expected a Gemma-2 folder)")
        model_type = json.loads((Path(cfg.path) / "config.json").read_text()).get("model_type")
        if model_type != "gemma2":
            raise ValueError(f"text_encoder.path: {cfg.path}/config.json has model_type {model_type!r}, not 'gemma2': "
                             "Lumina-2 reads Gemma-2 hidden states (e.g. google/gemma-2-2b)")
        self.cfg = cfg
        device = torch.device(device)
        # bf16 is the published inference dtype on GPU; CPU kernels are fp32-only in practice
        dtype = torch_dtype(cfg.dtype) if device.type != "cpu" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(cfg.path, dtype=dtype).to(device)
        self.model.requires_grad_(cfg.trainable)
        if cfg.trainable:
            # layers after the chosen hidden state (and the final norm unless layer is -1) never get a
            # gradient: keep them frozen so the optimizer holds only parameters that learn
            n = self.model.config.num_hidden_layers
            k = cfg.layer % (n + 1)  # hidden_states[k] is the output of layer k-1 (k = n: after the norm)
            for layer in self.model.layers[k:]:
                layer.requires_grad_(False)
            if k < n:
                self.model.norm.requires_grad_(False)
        self.model.train(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> GemmaTextEncoder:
        # dropout stays off even when fine-tuning, as in Lumina's training code
        return super().train(False)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) input ids and (B, L) attention mask, right padded to the longest caption (<= max_tokens)."""
        texts = [build_prompt(c, self.cfg.system_prompt) for c in captions]
        tok = self.tokenizer(
            texts, padding="longest", max_length=self.cfg.max_tokens, truncation=True, return_tensors="pt"
        )
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask -> (B, L, D) features of hidden_states[layer], (B, L) bool mask."""
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        mask = attention_mask.bool()
        # padding positions hold garbage Gemma states: zero them so cached and live features agree
        feats = out.hidden_states[self.cfg.layer] * mask[..., None]  # (B, L, D)
        return feats, mask

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ((B, L, D) features, (B, L) bool mask). No gradients unless the encoder is trainable."""
        ids, mask = self.tokenize(captions)
        with torch.set_grad_enabled(self.cfg.trainable and torch.is_grad_enabled()):
            return self.forward(ids, mask)
