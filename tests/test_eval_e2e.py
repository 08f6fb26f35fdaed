"""End to end on real tiny exports of both families: the trainer's export layout (weights + meta.json) in a
run folder, family detection, generation, tagging, curve, cache reuse, and the denoising spectra."""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_toys import build_toy_tagger

from lumina_illus.config import config_from_raw, to_dict
from lumina_illus.families import get_family

ROOT = Path(__file__).parents[1]
torch.set_num_threads(1)


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "eval" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lumina2_model(tmp: Path) -> dict:
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    te = make_tiny_gemma2(tmp / "gemma", vocab_corpus=["1girl solo trigger_alice trigger_bob looking at viewer"])
    return {"arch": {"preset": "tiny"}, "text_encoder": {"path": str(te), "max_tokens": 64},
            "vae": {"path": str(make_tiny_flux_vae(tmp / "vae"))}, "sampler": {"steps": 2, "guidance": 2.0}}


def _sdxl_model(tmp: Path) -> dict:
    from lumina_illus.models.tiny_sdxl import make_tiny_sdxl

    return {"pretrained": str(make_tiny_sdxl(tmp / "sdxl")), "sampler": {"steps": 2, "guidance": 2.0}}


@pytest.fixture(scope="module", params=["lumina2", "sdxl"])
def run_dir(request, tmp_path_factory) -> Path:
    family = request.param
    tmp = tmp_path_factory.mktemp(f"e2e_{family}")
    model = {"lumina2": _lumina2_model, "sdxl": _sdxl_model}[family](tmp)
    cfg = config_from_raw({
        "family": family,
        "model": model,
        "run": {"name": f"tiny_{family}", "out_dir": str(tmp / "runs")},
        "checkpoint": {"export_layouts": ["original"]},
    })
    parts = get_family(family).build_training(cfg, torch.device("cpu"))
    for step in (20, 10):  # written out of order: discovery sorts by samples seen
        torch.manual_seed(step)
        sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
              for k, v in parts.module.state_dict().items()}
        out = cfg.run_dir / "ckpt" / f"step_{step:07d}"
        out.mkdir(parents=True)
        meta = {"family": family, "step": step, "samples_seen": 32 * step, "flops_seen": 1e12 * step,
                "train_seconds": 36.0 * step, "run": cfg.run.name, "config": to_dict(cfg)}
        parts.export(sd, out, meta)
        (out / "meta.json").write_text(json.dumps(meta))
    return cfg.run_dir


def test_char_recall_cli_on_a_real_tiny_run(run_dir, tmp_path):
    chars = tmp_path / "chars.csv"
    chars.write_text("name,tag,prompt,train_samples\nAlice,alice,\"1girl, trigger_alice\",3000\n"
                     "Bob,bob,\"1girl, trigger_bob\",40\n")
    args = [str(run_dir), "--characters", str(chars), "--tagger", str(build_toy_tagger(tmp_path / "tagger")),
            "--sizes", "64x64", "--seeds", "0,1", "--steps", "2", "--wandb", "disabled", "--quiet", "--threads", "1"]
    cli = _cli("char_recall")
    curves = cli.main(args)
    out = run_dir / "eval" / "char_recall"  # default: beside the run's checkpoints
    run = run_dir.name
    pts = curves[run]
    assert [p["samples_seen"] for p in pts] == [320, 640]
    first = json.loads((out / run / "step_0000010.json").read_text())
    n = 2 * 3 * 1  # seeds x default templates x sizes
    assert first["images"] == {"generated": 2 * n, "cached": 0}
    assert [c["n"] for c in first["characters"]] == [n, n] and first["per_size"]["64x64"]["n"] == 2 * n
    assert first["checkpoint"]["family"] == run.removeprefix("tiny_")
    assert (out / "curve.png").is_file() and len(list((out / "cache").rglob("*.png"))) == 2 * 2 * n
    # a re-run generates nothing and loads no model; with --examples the report shows training images
    examples = tmp_path / "examples"
    examples.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(examples / "alice.png")
    cli.main([*args, "--examples", str(examples), "--x", "flops", "--per-size"])
    assert (out / "curve_sizes.png").is_file()
    with pytest.raises(SystemExit, match=r"--sizes \(\w+, .*step_0000010\): 60x60: width and height must be "
                                         r"positive multiples of (16|8)"):
        cli.main([a if a != "64x64" else "60x60,64x64" for a in args])
    pts = json.loads((out / "curve.json").read_text())[run]
    assert [(p["flops_seen"], p["train_seconds"]) for p in pts] == [(1e13, 360.0), (2e13, 720.0)]
    assert (out / "curve_flops.png").is_file()
    again = json.loads((out / run / "step_0000020.json").read_text())
    assert again["images"] == {"generated": 0, "cached": 2 * n}
    check_report(out / "report.html", characters=["Alice", "Bob"], checkpoints=2, examples={"Alice"})


class _Images(HTMLParser):
    """Every <img> of a page, with the character section (<h3>) it stands in."""

    def __init__(self) -> None:
        super().__init__()
        self.section, self.heading, self.images = "", False, []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.heading = tag == "h3" or (self.heading and tag == "small")
        if tag == "img":
            self.images.append((self.section, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.heading and data.strip():
            self.section, self.heading = data.strip(), False


def check_report(path: Path, characters: list[str], checkpoints: int, examples: set[str]) -> None:
    """Every picture of the page decodes; each character has its generated strip (and training image)."""
    import base64
    import io

    page = _Images()
    page.feed(path.read_text(encoding="utf-8"))
    for _, attrs in page.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]  # self-contained: nothing to go missing
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for name in characters:
        alts = [a["alt"] for sec, a in page.images if sec == name]
        assert len([a for a in alts if "step" in a]) == min(checkpoints, 3), (name, alts)
        assert ("training image" in alts) == (name in examples), (name, alts)
    assert sum(1 for sec, _ in page.images if sec not in characters) >= 1  # the curves


def test_denoise_fft_cli_on_a_real_tiny_checkpoint(run_dir, tmp_path):
    paths = _cli("denoise_fft").main([str(run_dir / "ckpt" / "step_0000010"), "--size", "64x48", "--steps", "3",
                                      "--guidance", "4", "1", "--out", str(tmp_path), "--device", "cpu"])
    for p in paths:
        rows = json.loads(p.read_text())["trajectory"]
        ts = [r["t"] for r in rows]
        assert len(rows) in (3, 4) and ts == sorted(ts) and 0.0 <= ts[0] < 0.5 and ts[-1] <= 1.0
        assert len(rows[0]["latent_x"]["radial"]) == 3 + 1  # latents 6 x 8: rings up to min side / 2
        assert (p.parent / "denoise_fft.png").is_file()
