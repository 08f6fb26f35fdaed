"""Build the toy world and its tiny components once, cached under one folder (default runs/toy):

    runs/toy/
      world.json              what was built: world config + version, and each component's report
      shards/toy-*.tar        webdataset shards (.png + .txt + .json with control tokens) + manifest.json
      characters.csv          name,tag,prompt,train_samples (eval/char_recall.py)
      components/vae/         tiny Flux-architecture AutoencoderKL trained on the world (16 channels)
      components/gemma/       tiny random Gemma-2 + word-level tokenizer fitted on the world's captions
      components/tagger/      WD-format tagger: model.onnx + selected_tags.csv
      components/sdxl/        tiny SDXL pipeline folder (CLIP-L/bigG, UNet), its VAE trained on the world

    info = build_toy_world("runs/toy", WorldConfig(seed=0), sdxl=True)

Every part is keyed by (world config, WORLD_VERSION, the part's own config): a part whose key matches
the one recorded in its folder's `.built.json` is reused, anything else is rebuilt.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lumina_illus.toyworld.tagger import TaggerConfig, train_tagger
from lumina_illus.toyworld.vae_train import VAETrainConfig, train_vae
from lumina_illus.toyworld.world import WorldConfig, sample_world, world_info, write_world

MARKER = ".built.json"
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # VAEConfig defaults (published Flux AE normalisation)
SDXL_SCALE, SDXL_SHIFT = 0.13025, 0.0  # published SDXL VAE normalisation


@dataclass
class ComponentsConfig:
    vae_channels: tuple[int, int, int, int] = (16, 32, 32, 32)  # block widths of the tiny Flux-like AE
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    sdxl_vae: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(steps=800, decoder_steps=100))
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    gemma_hidden: int = 32  # tiny Gemma-2 width (the DiT's caption feature size)


def _cached(folder: Path, key: dict[str, Any], build: Callable[[Path], dict[str, Any]], what: str) -> dict[str, Any]:
    """Run `build(folder)` unless `folder/.built.json` records the same key; returns its report."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("key") == key:
            print(f"[toyworld] {what}: cached in {folder}")
            return done.get("report", {})
    if folder.exists():
        shutil.rmtree(folder)  # a stale or half-built part never mixes with a new one
    folder.mkdir(parents=True)
    t0 = time.time()
    print(f"[toyworld] {what}: building in {folder}")
    report = build(folder)
    report["build_seconds"] = round(time.time() - t0, 1)
    marker.write_text(json.dumps({"key": key, "report": report}, indent=1))
    return report


def caption_corpus(world: WorldConfig) -> list[str]:
    """Every caption word the tiny tokenizer must know: NL captions and tag texts of the world."""
    lines = []
    for s in sample_world(world):
        lines.append(s.caption)
        lines.append(", ".join(t.replace("_", " ") for ts in s.tags.values() for t in ts))
    return lines


def build_toy_world(
    out_dir: str | Path, world: WorldConfig, cfg: ComponentsConfig | None = None, sdxl: bool = False
) -> dict[str, Any]:
    """Build (or reuse) shards, characters.csv and the tiny components; returns world.json's content."""
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    cfg = cfg or ComponentsConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = world_info(world)
    comp = out / "components"
    reports: dict[str, Any] = {}

    def shards(folder: Path) -> dict[str, Any]:
        manifest = write_world(world, folder)
        return {"samples": manifest["samples"], "shards": len(manifest["shards"]), "bytes": manifest["bytes"]}

    # shards and characters.csv live together in out/ so the world stays one folder for users
    reports["shards"] = _cached(out / "shards", base, lambda f: shards(f.parent), "world shards")

    def vae(folder: Path) -> dict[str, Any]:
        make_tiny_flux_vae(folder, channels=cfg.vae_channels, seed=world.seed)
        return train_vae(folder, world, FLUX_SCALE, FLUX_SHIFT, cfg.vae)

    key = {**base, "vae": asdict(cfg.vae), "channels": list(cfg.vae_channels)}
    reports["vae"] = _cached(comp / "vae", key, vae, "tiny Flux VAE")

    def gemma(folder: Path) -> dict[str, Any]:
        make_tiny_gemma2(folder, vocab_corpus=caption_corpus(world), hidden=cfg.gemma_hidden, seed=world.seed)
        from transformers import AutoTokenizer

        return {"vocab_size": len(AutoTokenizer.from_pretrained(str(folder))), "hidden": cfg.gemma_hidden}

    reports["gemma"] = _cached(comp / "gemma", {**base, "hidden": cfg.gemma_hidden}, gemma, "tiny Gemma-2")
    # the tagger also learns from VAE round trips (what generated images look like), so it depends on the VAE
    key = {**base, "tagger": asdict(cfg.tagger), "vae": reports["vae"]}
    reports["tagger"] = _cached(comp / "tagger", key, lambda f: train_tagger(f, world, cfg.tagger, comp / "vae"),
                                "WD tagger")  # fmt: skip

    if sdxl:
        def sdxl_build(folder: Path) -> dict[str, Any]:
            from lumina_illus.models.tiny_sdxl import make_tiny_sdxl

            make_tiny_sdxl(folder, seed=world.seed)
            return {"vae": train_vae(folder / "vae", world, SDXL_SCALE, SDXL_SHIFT, cfg.sdxl_vae)}

        key = {**base, "sdxl_vae": asdict(cfg.sdxl_vae)}
        reports["sdxl"] = _cached(comp / "sdxl", key, sdxl_build, "tiny SDXL")

    info = {"world": base, "reports": reports}
    (out / "world.json").write_text(json.dumps(info, indent=1))
    return info
