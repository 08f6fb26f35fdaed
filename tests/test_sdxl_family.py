"""The "sdxl" family: text chunking vs diffusers' encode_prompt, micro-conditioning, gradients and
param groups, FLOPs measurement, export -> load_generator, detection."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lumina_illus.config import config_from_raw, to_dict
from lumina_illus.data.batch import Batch
from lumina_illus.families import METADATA_KEY, detect_family, get_family
from lumina_illus.models.sdxl import (
    CHUNK,
    SDXLTextConditioner,
    chunk_token_ids,
    load_components,
    time_ids,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def comps(tiny):
    return load_components(tiny)


def _cfg(tiny, text_encoder_lr=1e-5, **objective):
    raw = {
        "family": "sdxl",
        "model": {"pretrained": str(tiny), "objective": {"prediction": "v", "zero_terminal_snr": True, **objective},
                  "sampler": {"spacing": "trailing", "steps": 3, "guidance": 3.0}},
        "optim": {"lr": 1e-4, "text_encoder_lr": text_encoder_lr},
        "checkpoint": {"export_layouts": ["original", "diffusers"]},
    }
    return config_from_raw(raw, "test.yaml")


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return Batch(keys=[f"s/{i}" for i in range(n)], captions=["the girl, red hair " * 20, ""][:n],
                 images=[torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(n)],
                 original_sizes=[(100, 90), (64, 64)][:n], crops=[(3, 4), (0, 0)][:n],
                 target_sizes=[(size, size)] * n)


def test_chunking_wraps_every_chunk_in_bos_eos(comps):
    tok = comps.tokenizer
    long = "the girl, red hair " * 20  # ~ 200 tokens with the tiny byte-level BPE
    n_tokens = len(tok(long, add_special_tokens=False)["input_ids"])
    assert 2 * CHUNK < n_tokens <= 3 * CHUNK
    ids = chunk_token_ids(tok, [long, ""], max_chunks=4)
    assert ids.shape == (2, 3, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert torch.all(ids[:, :, 0] == bos)
    assert torch.all(ids[0, :2, 76] == eos)  # full chunks: BOS + 75 tokens + EOS
    last = n_tokens - 2 * CHUNK
    assert ids[0, 2, last + 1] == eos and torch.all(ids[0, 2, last + 2 :] == pad)
    assert ids[1, 0, 1] == eos and torch.all(ids[1, 1:, 1] == eos)  # empty prompt: empty chunks
    body = torch.cat([ids[0, c, 1:76] for c in range(2)])
    assert body.tolist() == tok(long, add_special_tokens=False)["input_ids"][: 2 * CHUNK]
    assert chunk_token_ids(tok, [long], max_chunks=2).shape == (1, 2, 77)  # cut after max_chunks
    pad2 = comps.tokenizer_2.pad_token_id  # bigG pads with "!" like SDXL's tokenizer_2
    assert chunk_token_ids(comps.tokenizer_2, ["a"], 3)[0, 0, -1] == pad2 != eos


def test_short_prompt_embeddings_equal_diffusers_encode_prompt(tiny, comps):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    prompts = ["the girl, red hair", "a cat"]
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
    text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2, 3)
    embeds, pooled = text.encode_prompts(prompts)
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_long_prompt_is_the_concatenation_of_its_chunks(comps):
    text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2, 3)
    long = "the girl, red hair " * 20
    embeds, pooled = text.encode_prompts([long])
    assert embeds.shape == (1, 3 * 77, 80)
    ids1, ids2 = text.token_ids([long], torch.device("cpu"))
    with torch.no_grad():
        for c in range(3):  # each 77-token slice is its chunk encoded alone
            h1 = comps.text_encoder(ids1[:, c], output_hidden_states=True).hidden_states[-2]
            out2 = comps.text_encoder_2(ids2[:, c], output_hidden_states=True)
            torch.testing.assert_close(embeds[:, c * 77 : (c + 1) * 77], torch.cat([h1, out2.hidden_states[-2]], -1))
            if c == 0:
                torch.testing.assert_close(pooled, out2.text_embeds)  # pooled from the first chunk


def test_time_ids_from_batch():
    b = _batch()
    assert time_ids(b, torch.device("cpu")).tolist() == [[100, 90, 3, 4, 64, 64], [64, 64, 0, 0, 64, 64]]
    bare = Batch(keys=["k"], captions=["c"], latents=[torch.zeros(4, 12, 8)])
    assert time_ids(bare, torch.device("cpu")).tolist() == [[96, 64, 0, 0, 96, 64]]


def test_training_step_gradients_and_param_groups(tiny):
    parts = get_family("sdxl").build_training(_cfg(tiny), torch.device("cpu"))
    names = {g["name"]: g for g in parts.param_groups}
    assert names["unet"]["lr"] == 1e-4 and names["text_encoders"]["lr"] == 1e-5
    inputs = parts.prepare(_batch(), torch.Generator().manual_seed(0))
    assert inputs["ids_1"].shape == (2, 3, 77) and "prompt_embeds" not in inputs
    out = parts.module(**inputs)
    assert out.per_sample.shape == (2,) and out.t.shape == (2,) and torch.all((out.t >= 0) & (out.t <= 1))
    out.loss.backward()
    trainable = [(n, p) for n, p in parts.module.named_parameters() if p.requires_grad]
    in_groups = {id(p) for g in parts.param_groups for p in g["params"]}
    assert {id(p) for _, p in trainable} == in_groups
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # CLIP-L's last layer is unused (penultimate-layer conditioning): frozen, not silently untrained
    assert not any(p.requires_grad for n, p in parts.module.named_parameters() if "text_encoder.final_layer_norm" in n)


def test_frozen_text_encoders_stay_out_of_the_module(tiny):
    parts = get_family("sdxl").build_training(_cfg(tiny, text_encoder_lr=None), torch.device("cpu"))
    assert parts.module.text_encoder is None and [g["name"] for g in parts.param_groups] == ["unet"]
    assert all(n.startswith("unet.") for n, _ in parts.module.named_parameters())
    inputs = parts.prepare(_batch(), torch.Generator().manual_seed(0))
    assert inputs["prompt_embeds"].shape == (2, 3 * 77, 80) and not inputs["prompt_embeds"].requires_grad
    parts.module(**inputs).loss.backward()


def test_prepare_targets_follow_the_objective(tiny):
    parts = get_family("sdxl").build_training(_cfg(tiny), torch.device("cpu"))
    b = _batch()
    a = parts.prepare(b, torch.Generator().manual_seed(7))
    again = parts.prepare(b, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], again[k]) for k in a)  # the trainer's generator makes prepare resumable
    from lumina_illus.objectives.diffusion import DiffusionConfig, NoiseSchedule

    sched = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    ab = sched.alphas_cumprod[a["timesteps"]].float().view(-1, 1, 1, 1)
    # v = a*eps - s*x0 and x_t = a*x0 + s*eps  =>  x0 = a*x_t - s*v
    x0 = ab.sqrt() * a["noisy"] - (1 - ab).sqrt() * a["target"]
    from lumina_illus.models.vae import LatentCodec

    codec = LatentCodec(_cfg(tiny).model.vae, "cpu", vae=load_components(tiny).vae)
    torch.testing.assert_close(x0, torch.stack(codec.encode(b.images)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one size"):
        mixed = Batch(keys=["a", "b"], captions=["x", "y"], images=[torch.zeros(3, 64, 64), torch.zeros(3, 64, 96)])
        parts.prepare(mixed, torch.Generator())


def test_flops_measured_on_meta_equal_a_real_forward(tiny, comps):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    parts = get_family("sdxl").build_training(_cfg(tiny, text_encoder_lr=None), torch.device("cpu"))
    b = _batch(n=1)
    b.captions = ["a cat"]
    inputs = parts.prepare(b, torch.Generator().manual_seed(0))
    # the math SDPA backend runs attention as counted matmuls (CPU's fused kernel has no FLOP formula)
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        parts.module(**inputs)
    assert parts.flops(b) == pytest.approx(3 * fc.get_total_flops(), rel=1e-3)
    b4 = _batch(n=1, size=128)
    b4.captions = ["a cat"]
    assert 3.0 < parts.flops(b4) / parts.flops(b) < 4.5  # ~ linear in pixels (plus size-independent parts)
    assert parts.tokens(b) == 16  # 64x64 image = 4x4 tokens of 16 px


def test_export_then_load_generator_reproduces_images(tiny, tmp_path):
    fam = get_family("sdxl")
    cfg = _cfg(tiny)
    parts = fam.build_training(cfg, torch.device("cpu"))
    with torch.no_grad():  # move away from the initial weights so the export must carry them
        for p in parts.module.unet.conv_out.parameters():
            p.add_(0.01)
    meta = {"family": "sdxl", "step": 3, "samples_seen": 12, "run": "t", "config": to_dict(cfg)}
    sd = {k: v.detach().clone() for k, v in parts.module.state_dict().items()}
    files = parts.export(sd, tmp_path / "step_0000003", meta)
    single = tmp_path / "step_0000003" / "sdxl.safetensors"
    assert single in files and (tmp_path / "step_0000003" / "diffusers" / "model_index.json").is_file()
    keys = set(load_file(single))
    assert "v_pred" in keys and "ztsnr" in keys  # v-pred + ZTSNR recognised by ComfyUI / Forge
    with safe_open(str(single), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["samples_seen"] == 12

    live = parts.generator(parts.module).generate(["the girl"], [(64, 64)], [0])[0]
    for path in (tmp_path / "step_0000003", single):
        loaded = fam.load_generator(path, torch.device("cpu"))
        assert loaded.sampler.prediction == "v" and loaded.sampler.cfg.spacing == "trailing"
        assert loaded.generate(["the girl"], [(64, 64)], [0])[0].tobytes() == live.tobytes(), path
    assert detect_family(single).name == "sdxl" and fam.detect(tmp_path / "step_0000003")
    assert fam.detect(tiny) and not fam.detect(tmp_path)


def test_community_single_file_without_metadata_uses_markers(tiny, comps, tmp_path):
    from lumina_illus.models import sdxl_checkpoint as ck

    state = {n: getattr(comps, n).state_dict() for n in ck.COMPONENTS}
    path = ck.write_single_file(tmp_path / "community.safetensors", state, dict(comps.unet.config),
                                dict(comps.vae.config), v_pred=True, ztsnr=True)
    gen = get_family("sdxl").load_generator(path, torch.device("cpu"), components=str(tiny))
    assert gen.sampler.prediction == "v" and gen.sampler.cfg.spacing == "trailing"
    assert gen.sampler.schedule.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match="components"):
        get_family("sdxl").load_generator(path, torch.device("cpu"))


def test_sample_cli_on_a_community_single_file(tiny, comps, tmp_path):
    from PIL import Image

    from lumina_illus import sample
    from lumina_illus.models import sdxl_checkpoint as ck

    state = {n: getattr(comps, n).state_dict() for n in ck.COMPONENTS}
    path = ck.write_single_file(tmp_path / "community.safetensors", state, dict(comps.unet.config),
                                dict(comps.vae.config), v_pred=True, ztsnr=True)
    paths = sample.main(["--ckpt", str(path), "--text-encoder", str(tiny), "--vae", str(tiny / "vae"),
                         "--prompt", "the girl", "--size", "64x48", "--steps", "2", "--cfg", "2.0", "--num", "2",
                         "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert [Image.open(p).size for p in paths] == [(64, 48)] * 2
    with pytest.raises(TypeError, match="unknown options"):
        get_family("sdxl").load_generator(path, torch.device("cpu"), components=str(tiny), shift=3.0)


# ------------------------------------------------------------------ long prompts vs kohya's sd-scripts
# Faithful transcriptions of the published SDXL long-prompt rule of kohya-ss/sd-scripts (the trainer
# most SDXL fine-tunes come from), run with --max_token_length 225:
#   ids:    library/strategy_base.py, TokenizeStrategy._get_input_ids (unweighted), called by
#           library/strategy_sdxl.py, SdxlTokenizeStrategy.tokenize (max_length = 225 + 2; it forces
#           tokenizer2.pad_token_id = 0, the "!" that bigG pads with)
#   states: library/strategy_sdxl.py, SdxlTextEncodingStrategy._get_hidden_states_sdxl and
#           _pool_workaround
# sd-scripts then keeps one BOS state, each chunk's 75 token states and the last state (227 rows for
# 3 chunks); we keep all 77 rows of every chunk (3 x 77), as ComfyUI (comfy/sd1_clip.py,
# ClipTokenWeightEncoder.encode_token_weights: torch.cat of the chunk outputs) and A1111 do.


def _sd_scripts_input_ids(tokenizer, text: str, max_token_length: int = 225) -> torch.Tensor:
    max_length = max_token_length + 2
    input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt").input_ids
    input_ids = input_ids.squeeze(0)
    iids_list = []
    if tokenizer.pad_token_id == tokenizer.eos_token_id:  # v1 (CLIP-L pads with EOS)
        for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
            ids_chunk = (input_ids[0].unsqueeze(0), input_ids[i : i + tokenizer.model_max_length - 2],
                         input_ids[-1].unsqueeze(0))
            iids_list.append(torch.cat(ids_chunk))
    else:  # v2 or SDXL
        for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
            ids_chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i : i + tokenizer.model_max_length - 2],
                                   input_ids[-1].unsqueeze(0)))
            if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                ids_chunk[-1] = tokenizer.eos_token_id
            if ids_chunk[1] == tokenizer.pad_token_id:
                ids_chunk[1] = tokenizer.eos_token_id
            iids_list.append(ids_chunk)
    return torch.stack(iids_list)  # (3, 77)


def _sd_scripts_hidden_states(te1, te2, tok1, tok2, input_ids1, input_ids2):
    b_size = input_ids1.size()[0]
    max_token_length = input_ids1.size()[1] * input_ids1.size()[2]
    input_ids1 = input_ids1.reshape((-1, tok1.model_max_length))  # batch_size*n, 77
    input_ids2 = input_ids2.reshape((-1, tok2.model_max_length))
    hidden_states1 = te1(input_ids1, output_hidden_states=True, return_dict=True)["hidden_states"][-2]  # [11] of 12
    enc_out = te2(input_ids2, output_hidden_states=True, return_dict=True)
    hidden_states2 = enc_out["hidden_states"][-2]  # penultimate layer
    # _pool_workaround: the last_hidden_state at the first EOS of each chunk, through text_projection
    eos_token_index = torch.argmax((input_ids2 == tok2.eos_token_id).int(), dim=1)
    pool2 = enc_out["last_hidden_state"][torch.arange(input_ids2.shape[0]), eos_token_index]
    pool2 = te2.text_projection(pool2)
    n_size = max_token_length // 75
    hidden_states1 = hidden_states1.reshape((b_size, -1, hidden_states1.shape[-1]))
    hidden_states2 = hidden_states2.reshape((b_size, -1, hidden_states2.shape[-1]))
    states_list = [hidden_states1[:, 0].unsqueeze(1)]  # <BOS>
    for i in range(1, max_token_length, tok1.model_max_length):
        states_list.append(hidden_states1[:, i : i + tok1.model_max_length - 2])
    states_list.append(hidden_states1[:, -1].unsqueeze(1))  # <EOS>
    hidden_states1 = torch.cat(states_list, dim=1)
    states_list = [hidden_states2[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, tok2.model_max_length):
        states_list.append(hidden_states2[:, i : i + tok2.model_max_length - 2])
    states_list.append(hidden_states2[:, -1].unsqueeze(1))  # <EOS> or <PAD>
    hidden_states2 = torch.cat(states_list, dim=1)
    pool2 = pool2[::n_size]  # the first chunk's
    return hidden_states1, hidden_states2, pool2


def _prompt_of(tokenizer, n_tokens: int) -> str:
    """Danbooru-style tags in a seeded order (no period a wrong chunk length could hide behind),
    cut to exactly n_tokens tokens."""
    import random

    tags = ["1girl", "solo", "long hair", "red eyes", "smile", "hat", "blue sky", "tree", "school uniform",
            "outdoors", "looking at viewer", "cherry blossoms", "holding umbrella", "from side"]
    rng = random.Random(0)
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += rng.choice(tags) + ", "
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > n_tokens:
        text = text[:-1]
    return text


def test_200_token_prompt_matches_sd_scripts_chunking(comps):
    prompt = _prompt_of(comps.tokenizer, 200)
    for tok in (comps.tokenizer, comps.tokenizer_2):
        assert len(tok(prompt, add_special_tokens=False)["input_ids"]) == 200
    assert comps.tokenizer_2.pad_token_id == 0  # what sd-scripts forces on bigG's tokenizer
    text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2, 4)
    ids1, ids2 = text.token_ids([prompt], torch.device("cpu"))  # (1, 3, 77) each
    ref1 = _sd_scripts_input_ids(comps.tokenizer, prompt)
    ref2 = _sd_scripts_input_ids(comps.tokenizer_2, prompt)
    assert torch.equal(ids1[0], ref1) and torch.equal(ids2[0], ref2)
    embeds, pooled = text.encode_prompts([prompt])  # (1, 3 * 77, 80), (1, 32)
    with torch.no_grad():
        h1, h2, pool2 = _sd_scripts_hidden_states(comps.text_encoder, comps.text_encoder_2, comps.tokenizer,
                                                  comps.tokenizer_2, ref1[None], ref2[None])
    assert embeds.shape == (1, 3 * 77, 80) and h1.shape[1] == h2.shape[1] == 227
    # our rows without the inner BOS/EOS rows that sd-scripts drops: the first BOS, 3 x 75 tokens, the last row
    ours = torch.cat([embeds[:, :1], *(embeds[:, c * 77 + 1 : c * 77 + 76] for c in range(3)), embeds[:, -1:]], 1)
    torch.testing.assert_close(ours, torch.cat([h1, h2], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, pool2, rtol=1e-5, atol=1e-5)
