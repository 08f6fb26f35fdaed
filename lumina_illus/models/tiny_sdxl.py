"""Tiny random SDXL, written to disk in the diffusers folder layout of stabilityai/stable-diffusion-xl-base-1.0.

    python -m lumina_illus.models.tiny_sdxl runs/toy/components/sdxl

    from lumina_illus.models.tiny_sdxl import make_tiny_sdxl
    make_tiny_sdxl("/tmp/tiny_sdxl", seed=0)   # unet/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ vae/ scheduler/

The structure is SDXL's, only narrower: UNet with DownBlock2D + 2 CrossAttn levels and
addition_embed_type "text_time" (cross-attention dim = CLIP-L hidden + bigG hidden, pooled bigG +
6 micro-conditioning values feed the add embedding), a CLIP-L-like `CLIPTextModel` (quick_gelu), a
bigG-like `CLIPTextModelWithProjection` (gelu), byte-level BPE CLIP tokenizers, and a 4-level
AutoencoderKL (8x down, 4 latent channels). Everything loads through the same code paths as the
published weights, so tests and the toy world never branch on "tiny".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Byte-pair merges of the tiny tokenizers: a few frequent English / tag pairs so that some words are
# single tokens (like the real CLIP vocabulary) while most text still costs about one token per letter,
# which makes prompts over 75 tokens easy to write in tests.
_MERGES = ["t h", "th e</w>", "i n", "a n", "e r", "h a", "i r</w>", "o n", "r e", "e d</w>", "e s</w>"]

# Latent micro-conditioning values SDXL feeds per sample: original (h, w), crop (top, left), target (h, w)
N_TIME_IDS = 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (every byte gets one visible character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tiny_clip_tokenizer(out_dir: str | Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP byte-level BPE tokenizer (vocab.json + merges.txt) built like the real one: 256 byte
    symbols, the same with the end-of-word marker, a handful of merges, then the two special tokens.
    SDXL's second tokenizer pads with "!" instead of <|endoftext|>; `pad_token` reproduces that."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(out)


def tiny_clip_configs(vocab_size: int, bos: int, eos: int, pad_2: int) -> tuple:
    """(CLIP-L-like CLIPTextConfig, bigG-like CLIPTextConfig) with 3 layers so hidden_states[-2] is a
    real intermediate layer, as in SDXL's penultimate-layer conditioning."""
    from transformers import CLIPTextConfig

    common = dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    clip_l = CLIPTextConfig(hidden_size=32, projection_dim=32, hidden_act="quick_gelu", pad_token_id=eos, **common)
    # widths differ like the real encoders (768 vs 1280): diffusers tells the two towers apart by width
    clip_g = CLIPTextConfig(hidden_size=48, projection_dim=32, hidden_act="gelu", pad_token_id=pad_2, **common)
    return clip_l, clip_g


def tiny_unet_config(text_dim: int = 80, pooled_dim: int = 32, addition_time_embed_dim: int = 8) -> dict:
    """SDXL base UNet config, narrowed: same block types, text_time add-embedding and linear projections."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),  # >1 at the last level, like SDXL's (1, 2, 10)
        attention_head_dim=(2, 4, 4),  # diffusers' SDXL config stores head counts under this name
        cross_attention_dim=text_dim,  # CLIP-L hidden + bigG hidden
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + N_TIME_IDS * addition_time_embed_dim,
    )


def tiny_vae_config() -> dict:
    """SDXL VAE config, narrowed: 4 levels (8x down), 4 latent channels, scaling 0.13025."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,
    )


def scheduler_config() -> dict:
    """The SDXL base scheduler config (EulerDiscrete, scaled-linear betas 0.00085 -> 0.012)."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def make_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny SDXL pipeline folder (diffusers layout) to `out_dir`; returns the path."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    make_tiny_clip_tokenizer(out / "tokenizer")
    make_tiny_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    cfg_l, cfg_g = tiny_clip_configs(len(tok), tok.bos_token_id, tok.eos_token_id, tok2.pad_token_id)

    torch.manual_seed(seed)
    CLIPTextModel(cfg_l).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(cfg_g).save_pretrained(out / "text_encoder_2")
    unet_cfg = tiny_unet_config(cfg_l.hidden_size + cfg_g.hidden_size, cfg_g.projection_dim)
    UNet2DConditionModel(**unet_cfg).save_pretrained(out / "unet")
    AutoencoderKL(**tiny_vae_config()).save_pretrained(out / "vae")
    EulerDiscreteScheduler(**scheduler_config()).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return out


# model_index.json of stabilityai/stable-diffusion-xl-base-1.0 (what detect() and diffusers look for)
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder to write the tiny SDXL pipeline into")
    ap.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = ap.parse_args()
    print(make_tiny_sdxl(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
