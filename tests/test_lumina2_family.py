"""The lumina2 family bundle on tiny components: config validation, build_training -> prepare ->
forward -> backward, export -> detect -> load_generator round trips (EMA preferred), trainable Gemma."""

import json

import numpy as np
import pytest
import torch

from lumina_illus.config import ConfigError, config_from_raw, to_dict
from lumina_illus.data.batch import Batch
from lumina_illus.families import Generator, LossOutput, detect_family, get_family
from lumina_illus.models.checkpoint_io import save_nextdit
from lumina_illus.models.lumina2 import FAMILY, Lumina2Config
from lumina_illus.models.nextdit import NextDiT
from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2
from lumina_illus.objectives.flow_matching import FlowMatching

torch.set_num_threads(1)
CAPTIONS = ["1girl, red hair, smile", ""]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina2")
    return {"gemma": str(make_tiny_gemma2(root / "gemma", CAPTIONS)), "vae": str(make_tiny_flux_vae(root / "vae"))}


def _cfg(paths, **model):
    raw = {
        "family": "lumina2",
        "model": {
            "arch": {"preset": "tiny"},
            "text_encoder": {"path": paths["gemma"]},
            "vae": {"path": paths["vae"]},
            "sampler": {"steps": 2},
            **model,
        },
        "optim": {"lr": 1e-3},
    }
    return config_from_raw(raw, "test.yaml")


def _batch(n_images: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 48, generator=g) * 2 - 1, torch.rand(3, 64, 32, generator=g) * 2 - 1]
    return Batch(keys=["s/0", "s/1"], captions=list(CAPTIONS), images=imgs)


def _randomize(module: torch.nn.Module) -> None:
    """Zero-initialised projections would block gradients upstream; give them random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_registered_and_config_validation(paths):
    assert get_family("lumina2") is FAMILY
    cfg = _cfg(paths, arch={"preset": "tiny", "n_layers": 3})
    assert isinstance(cfg.model, Lumina2Config)
    arch = cfg.model.nextdit()
    assert arch.n_layers == 3 and arch.dim == 96  # preset defaults + override
    assert Lumina2Config().nextdit().dim == 2304  # default: the published 2B model
    # an override is validated together with the preset's other fields, not the 2B defaults
    wide = _cfg(paths, arch={"preset": "tiny", "dim": 128, "axes_dims": [8, 12, 12]}).model.nextdit()
    assert (wide.dim, wide.n_heads, wide.axes_dims) == (128, 4, (8, 12, 12))
    with pytest.raises(ConfigError, match=r"test\.yaml.*axes_dims.*head_dim 32"):
        _cfg(paths, arch={"preset": "tiny", "dim": 128})
    with pytest.raises(ConfigError, match=r"test\.yaml.*model\.arch\.n_layer"):
        _cfg(paths, arch={"n_layer": 3})
    with pytest.raises(ConfigError, match=r"test\.yaml.*arch\.preset.*'huge'"):
        _cfg(paths, arch={"preset": "huge"})
    with pytest.raises(ConfigError, match=r"test\.yaml.*model\.objective.*shift"):
        _cfg(paths, objective={"shift": "big"})


def test_training_step_and_parameter_ownership(paths):
    cfg = _cfg(paths)
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    module = parts.module
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    grouped = [p for g in parts.param_groups for p in g["params"]]
    assert {id(p) for p in grouped} == trainable and len(grouped) == len(trainable)
    assert [g["name"] for g in parts.param_groups] == ["dit"]
    names = {n for n, _ in module.named_parameters()}
    assert all(n.startswith("dit.") for n in names)  # VAE and frozen Gemma live outside the module
    assert not module.dit.norm_final.weight.requires_grad  # unused in forward: frozen (DESIGN.md)

    _randomize(module)
    batch = _batch()
    inputs = parts.prepare(batch, torch.Generator().manual_seed(0))
    out = module(**inputs)
    assert isinstance(out, LossOutput) and out.per_sample.shape == (2,) and out.t.shape == (2,)
    assert any(k.startswith("loss_t/") for k in out.extras)
    # the loss is the objective applied to the model's prediction at x_t
    fm = FlowMatching(cfg.model.objective)
    xt = fm.noisy_input(inputs["latents"], inputs["noise"], inputs["t"])
    pred = module.dit(xt, inputs["t"], inputs["cap_feats"], inputs["cap_mask"])
    ref, _ = fm.loss(pred, fm.target(inputs["latents"], inputs["noise"]))
    assert torch.allclose(out.loss, ref)
    out.loss.backward()
    no_grad = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []

    # resolution shift is per sample: tokens differ (6 vs 8 image tokens of 2x2 latent patches)
    assert parts.tokens(batch) == (32 * 48 + 64 * 32) // 256
    cap = inputs["cap_mask"].sum(1).tolist()
    expected = 3 * (module.dit.flops(6, cap[0]) + module.dit.flops(8, cap[1]))
    assert parts.flops(batch) == pytest.approx(expected)


def test_prepare_uses_cached_latents_and_text_features(paths):
    parts = FAMILY.build_training(_cfg(paths), torch.device("cpu"))
    batch = _batch()
    from_images = parts.prepare(batch, torch.Generator().manual_seed(0))
    lat = Batch(keys=batch.keys, captions=batch.captions, latents=[z.clone() for z in from_images["latents"]])
    from_latents = parts.prepare(lat, torch.Generator().manual_seed(0))
    for k in ("latents", "noise"):
        for a, b in zip(from_images[k], from_latents[k]):
            assert torch.equal(a, b)
    assert torch.equal(from_images["t"], from_latents["t"])
    feats, mask = from_images["cap_feats"], from_images["cap_mask"]
    cached = Batch(keys=batch.keys, captions=batch.captions, latents=lat.latents,
                   text_embeds=[f[m] for f, m in zip(feats, mask)])
    from_cache = parts.prepare(cached, torch.Generator().manual_seed(0))
    assert torch.equal(from_cache["cap_mask"], mask) and torch.allclose(from_cache["cap_feats"], feats)
    with pytest.raises(ValueError, match="neither images nor latents"):
        parts.prepare(Batch(keys=["k"], captions=["x"]), torch.Generator())


def test_trainable_text_encoder_gets_its_own_group_and_gradients(paths):
    cfg = _cfg(paths, text_encoder={"path": paths["gemma"], "trainable": True, "lr": 1e-5})
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    assert [(g["name"], g["lr"]) for g in parts.param_groups] == [("dit", 1e-3), ("text_encoder", 1e-5)]
    _randomize(parts.module)
    inputs = parts.prepare(_batch(), torch.Generator().manual_seed(0))
    assert "input_ids" in inputs and "cap_feats" not in inputs
    parts.module(**inputs).loss.backward()
    te = [(n, p) for n, p in parts.module.named_parameters() if n.startswith("text_encoder.") and p.requires_grad]
    assert te and all(p.grad is not None and p.grad.any() for _, p in te)


def _export(parts, cfg, out, offset: float = 0.0):
    sd = {k: v + offset if v.is_floating_point() and k != "dit.norm_final.weight" else v
          for k, v in parts.module.state_dict().items()}
    meta = {"family": "lumina2", "step": 1, "samples_seen": 2, "run": "t", "config": to_dict(cfg)}
    return parts.export(sd, out, meta), sd


def test_export_detect_and_load_generator_round_trip(paths, tmp_path):
    cfg = _cfg(paths)
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    _randomize(parts.module)
    step = tmp_path / "ckpt" / "step_0000001"
    files, raw = _export(parts, cfg, step)
    names = sorted(p.relative_to(step).as_posix() for p in files)
    assert names == ["diffusers/config.json", "diffusers/diffusion_pytorch_model.safetensors",
                     "lumina2.safetensors", "lumina2_comfy.safetensors"]

    # every exported form is detected as lumina2, and loads the same weights
    for p in (step, step / "lumina2.safetensors", step / "lumina2_comfy.safetensors", step / "diffusers"):
        assert FAMILY.detect(p), p
    assert detect_family(step) is FAMILY
    gen = FAMILY.load_generator(step / "lumina2_comfy.safetensors")
    assert isinstance(gen, Generator)  # the families.Generator protocol
    for k, v in gen.model.state_dict().items():
        assert torch.equal(v, raw["dit." + k]), k

    # same images as the live generator over the training module
    live = parts.generator(parts.module)
    a = live.generate(["1girl, red hair"], [(32, 32)], [3])[0]
    b = gen.generate(["1girl, red hair"], [(32, 32)], [3])[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1

    # EMA weights are preferred when the step folder has them
    _export(parts, cfg, step / "ema", offset=0.01)
    ema = FAMILY.load_generator(step)
    w = ema.model.state_dict()["x_embedder.weight"]
    assert torch.allclose(w, raw["dit.x_embedder.weight"] + 0.01)
    # sampler options pass through
    assert FAMILY.load_generator(step, steps=7).cfg.steps == 7


def test_foreign_checkpoint_needs_component_paths(paths, tmp_path):
    model = NextDiT(Lumina2Config(arch={"preset": "tiny"}).nextdit())
    save_nextdit(model, tmp_path / "transformer", layout="diffusers")  # no lumina_illus metadata
    with pytest.raises(ValueError, match="no text_encoder path.*text_encoder_path"):
        FAMILY.load_generator(tmp_path / "transformer")
    gen = FAMILY.load_generator(tmp_path / "transformer", text_encoder_path=paths["gemma"], vae_path=paths["vae"])
    assert gen.generate(["x"], [(16, 16)], [0], steps=1)[0].size == (16, 16)
    with pytest.raises(TypeError, match="unknown options"):
        FAMILY.load_generator(tmp_path / "transformer", text_encoder_path=paths["gemma"], vae_path=paths["vae"], stepz=3)
    with pytest.raises(FileNotFoundError):
        FAMILY.load_generator(tmp_path / "missing")


def test_detect_rejects_other_checkpoints(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"  # ComfyUI's prefix, but UNet keys
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sdxl))
    assert not FAMILY.detect(sdxl)
    assert not FAMILY.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert not FAMILY.detect(tmp_path)


def test_trained_text_encoder_is_exported_and_reloaded(paths, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    cfg = _cfg(paths, text_encoder={"path": paths["gemma"], "trainable": True, "lr": 1e-5})
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    _randomize(parts.module)
    files, raw = _export(parts, cfg, tmp_path / "step", offset=0.02)
    te_dir = tmp_path / "step" / "text_encoder"
    assert te_dir / "model.safetensors" in files and te_dir / "config.json" in files
    gen = FAMILY.load_generator(tmp_path / "step")
    for k, v in gen.text_encoder.model.state_dict().items():
        assert torch.equal(v, raw["text_encoder.model." + k]), k
    assert not any(p.requires_grad for p in gen.text_encoder.parameters())
    # a plain transformers folder: loads with AutoModel / AutoTokenizer as it is, the trained weights in it
    hf = AutoModel.from_pretrained(te_dir)
    assert all(torch.equal(v, raw["text_encoder.model." + k]) for k, v in hf.state_dict().items())
    assert AutoTokenizer.from_pretrained(te_dir)("hello").input_ids == AutoTokenizer.from_pretrained(paths["gemma"])("hello").input_ids


def test_trainable_text_encoder_needs_its_own_lr_and_a_gemma2(paths, tmp_path):
    from lumina_illus.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.text_encoder.trainable needs its own learning rate"):
        FAMILY.build_training(_cfg(paths, text_encoder={"path": paths["gemma"], "trainable": True}), torch.device("cpu"))
    not_gemma = tmp_path / "clip"
    not_gemma.mkdir()
    (not_gemma / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ConfigError, match=r"model.text_encoder.path: .*clip/config.json has model_type 'clip_text_model'"):
        FAMILY.build_training(_cfg(paths, text_encoder={"path": str(not_gemma)}), torch.device("cpu"))


def test_pretrained_start_and_arch_conflict(paths, tmp_path):
    cfg = _cfg(paths)
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    _randomize(parts.module)
    _export(parts, cfg, tmp_path / "start")
    start = str(tmp_path / "start" / "lumina2.safetensors")
    again = FAMILY.build_training(_cfg(paths, pretrained=start, arch={"attention": "sdpa"}), torch.device("cpu"))
    for (k, v), w in zip(parts.module.state_dict().items(), again.module.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ConfigError, match=r"model\.arch\.n_layers = 5 but .*lumina2\.safetensors has 2"):
        FAMILY.build_training(_cfg(paths, pretrained=start, arch={"preset": "tiny", "n_layers": 5}), torch.device("cpu"))


def test_sample_cli_writes_images(paths, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from lumina_illus.sample import main

    cfg = _cfg(paths)
    parts = FAMILY.build_training(cfg, torch.device("cpu"))
    _randomize(parts.module)
    _export(parts, cfg, tmp_path / "step")
    out = tmp_path / "img.png"
    written = main(["--ckpt", str(tmp_path / "step"), "--prompt", "1girl, red hair", "--size", "48x32",
                    "--steps", "2", "--cfg", "3", "--seed", "1", "--out", str(out), "--device", "cpu"])
    assert written == [out] and Image.open(out).size == (48, 32)
    expected = FAMILY.load_generator(tmp_path / "step").generate(["1girl, red hair"], [(48, 32)], [1], steps=2, guidance=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected[0]))
    two = main(["--ckpt", str(tmp_path / "step"), "--prompt", "a", "--prompt", "b", "--size", "32x32",
                "--steps", "1", "--out", str(tmp_path / "many.png"), "--device", "cpu"])
    assert [p.name for p in two] == ["many_0.png", "many_1.png"]
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "step"), "--prompt", "a", "--size", "big"])
    help_text = subprocess.run([sys.executable, "-m", "lumina_illus.sample", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--ckpt" in help_text.stdout
