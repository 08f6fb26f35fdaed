"""Tiny random stand-ins for the frozen Lumina-2 components, written to disk like the real ones.

    make_tiny_gemma2("/tmp/gemma", vocab_corpus=["1girl, red hair", ...])
    make_tiny_flux_vae("/tmp/vae")
    make_random_gemma2("/tmp/gemma2b", num_hidden_layers=3)   # Gemma-2-2B's width, random weights
    make_random_flux_vae("/tmp/flux_vae")                      # the full Flux VAE, random weights

Tests, the toy world and CPU runs load these through exactly the same code paths as the published
Gemma-2-2B and Flux VAE (`AutoModel`/`AutoTokenizer.from_pretrained`, `AutoencoderKL.from_pretrained`),
so nothing downloads and nothing branches on "tiny". Weights are deterministic given `seed`.
GEMMA2_2B and FLUX_VAE are the published architectures (the fields of their config.json files).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# google/gemma-2-2b config.json: every field that shapes the network (Lumina-2's text encoder)
GEMMA2_2B: dict = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
)
# black-forest-labs/FLUX.1-dev vae/config.json (diffusers AutoencoderKL): 16 latent channels, 8x down
FLUX_VAE: dict = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)

# Special tokens in the order Gemma's tokenizer uses for its first ids (pad 0, eos 1, bos 2, unk 3).
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# A word, a `<Two Words>` marker such as Lumina's `<Prompt Start>`, or one punctuation character.
_WORD_RE = r"<[^<>\s]+(?: [^<>\s]+)?>|\w+|[^\w\s]"
# Words of the Lumina system prompt and common tag syntax, so tiny tokenizers cover them by default.
_BASE_CORPUS = [
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start>",
    "1girl 1boy solo red blue green yellow hair eyes smile looking at viewer , . : ( ) _ -",
]


def _words(corpus: list[str]) -> list[str]:
    """Word-level vocabulary: words, numbers, punctuation and `<...>` markers, in first-seen order."""
    seen: dict[str, None] = {}
    for line in corpus:
        for w in re.findall(_WORD_RE, line):
            seen.setdefault(w, None)
    return [w for w in seen if w not in _SPECIALS]


def make_tiny_tokenizer(dir: str | Path, vocab_corpus: list[str] | None = None):  # noqa: A002
    """Word-level tokenizer fitted on `vocab_corpus` (plus the system prompt), saved to `dir` so that
    `AutoTokenizer.from_pretrained(dir)` loads it offline. Adds <bos> in front like Gemma's."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = _words(_BASE_CORPUS + list(vocab_corpus or []))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # `<Prompt Start>` stays one token (Lumina inserts it between system prompt and caption)
    # kept pieces are the pattern's matches; whitespace between them is dropped
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_RE), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )
    fast.save_pretrained(str(dir))
    return fast


def make_tiny_gemma2(
    dir: str | Path,  # noqa: A002
    vocab_corpus: list[str] | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 16,
    intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random Gemma-2 text model (`Gemma2Model`, like Lumina-2's text encoder) and a tokenizer
    fitted on `vocab_corpus` into `dir`. Returns `dir`."""
    return _write_gemma2(
        dir, vocab_corpus, seed, torch.float32, tiny_vocab=True,
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=1024, sliding_window=64,
    )


def make_random_gemma2(
    dir: str | Path,  # noqa: A002
    vocab_corpus: list[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: object,
) -> Path:
    """Gemma-2-2B's architecture (GEMMA2_2B, 256000-token embedding included; `overrides` change fields,
    e.g. num_hidden_layers=3) with random weights stored in `dtype` (bf16, as published: half the bytes
    to write; GemmaTextEncoder loads them in its own dtype), and the word-level tokenizer of
    make_tiny_tokenizer (its ids are a prefix of the vocabulary). Returns `dir`."""
    return _write_gemma2(dir, vocab_corpus, seed, dtype, tiny_vocab=False, **{**GEMMA2_2B, **overrides})


def _write_gemma2(
    dir: str | Path, vocab_corpus: list[str] | None, seed: int, dtype: torch.dtype, tiny_vocab: bool,  # noqa: A002
    **fields: object,
) -> Path:
    """Tokenizer + `Gemma2Model(Gemma2Config(**fields))` initialised by transformers (normal(0, 0.02)
    linears and embedding) in `dtype`, saved to `dir`; `tiny_vocab`: the vocabulary is the tokenizer's."""
    from transformers import Gemma2Config, Gemma2Model

    dir = Path(dir)  # noqa: A001
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(dir, vocab_corpus)
    if tiny_vocab:
        fields["vocab_size"] = len(tokenizer)
    cfg = Gemma2Config(
        **fields,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built and initialised in `dtype`: no full-precision copy
        try:
            model = Gemma2Model(cfg)
        finally:
            torch.set_default_dtype(default)
    model.save_pretrained(str(dir))
    return dir


def make_tiny_flux_vae(
    dir: str | Path,  # noqa: A002
    channels: tuple[int, ...] = (8, 16, 16, 16),
    latent_channels: int = 16,
    layers_per_block: int = 1,
    norm_groups: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random diffusers `AutoencoderKL` with the Flux architecture choices: 16 latent channels,
    no quant/post-quant convs, scale 0.3611 / shift 0.1159, and 8x down-sampling (4 blocks). Returns `dir`."""
    if len(channels) != 4:
        raise ValueError(f"make_tiny_flux_vae: channels must have 4 entries (8x down-sampling), got {channels}")
    return _write_vae(
        dir, seed,
        **{**FLUX_VAE, "block_out_channels": tuple(channels), "layers_per_block": layers_per_block,
           "latent_channels": latent_channels, "norm_num_groups": norm_groups, "sample_size": 64},
    )


def make_random_flux_vae(dir: str | Path, seed: int = 0, **overrides: object) -> Path:  # noqa: A002
    """The full Flux VAE architecture (FLUX_VAE, ~84M parameters; `overrides` change fields) with random
    weights, saved in fp32 like the published file. Returns `dir`."""
    return _write_vae(dir, seed, **{**FLUX_VAE, **overrides})


def _write_vae(dir: str | Path, seed: int, **fields: object) -> Path:  # noqa: A002
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**fields)
    Path(dir).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(dir))
    return Path(dir)
