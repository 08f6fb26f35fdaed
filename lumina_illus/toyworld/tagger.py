"""A WD-format tagger for the toy world: a small CNN trained on world renders, exported as `model.onnx`
(input NHWC float32, BGR, 0..255, square; output per-tag sigmoid probabilities) beside
`selected_tags.csv` (`tag_id,name,category,count`: 9 rating, 0 general, 4 character), so
eval/char_recall.py reads it exactly like SmilingWolf's published taggers.

    report = train_tagger("runs/toy/components/tagger", world_cfg)   # {"heldout_char_accuracy": ...}

Training images are balanced over characters (a tagger should know rare characters as well as
frequent ones) and augmented with blur, noise and colour jitter, because it has to read the soft,
imperfect images of a barely trained generator. Background-only and random-blob images carry no
character tag, so an untrained generator's output scores low.
"""

from __future__ import annotations

import csv
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from tqdm import tqdm

from lumina_illus.evaluation.tagger import wd_preprocess
from lumina_illus.sampling.flow import to_pil
from lumina_illus.toyworld.render import Scene, render
from lumina_illus.toyworld.spec import (
    CATEGORY_CHARACTER,
    CATEGORY_GENERAL,
    CATEGORY_RATING,
    CHARACTERS,
    RATING,
)
from lumina_illus.toyworld.world import WorldConfig, random_scene, scene_tags


@dataclass
class TaggerConfig:
    size: int = 64  # model input side (WD v3 uses 448; the toy world's images are 64-128 px)
    per_character: int = 160  # training renders per character (balanced)
    negatives: int = 600  # background-only, random-blob and (with a VAE) random-latent images: no character
    heldout_per_character: int = 20  # fresh renders per character for the reported accuracy
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 32  # channels of the first conv; doubled twice
    vae_fraction: float = 0.5  # share of training images replaced by their VAE round trip (when a VAE is given)
    seed: int = 0


class TaggerNet(nn.Module):
    """NHWC BGR 0..255 in, per-tag probabilities out (the WD v3 graph contract)."""

    def __init__(self, n_tags: int, width: int = 32) -> None:
        super().__init__()
        c = [3, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for i in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(c[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c[-1], n_tags)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1], channels stay BGR
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, n_tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))  # (B, n_tags)


def tag_vocabulary(world_tags: list[dict[str, list[str]]]) -> list[tuple[str, int, int]]:
    """(name, category, count) rows in WD order: rating, then general tags by frequency, then every
    roster character (even one the given tags miss)."""
    general = Counter(t for tags in world_tags for t in tags.get("general", []))
    chars = Counter(t for tags in world_tags for t in tags.get("character", []))
    rows = [(RATING, CATEGORY_RATING, len(world_tags))]
    rows += [(t, CATEGORY_GENERAL, n) for t, n in sorted(general.items(), key=lambda kv: (-kv[1], kv[0]))]
    rows += [(ch.tag, CATEGORY_CHARACTER, chars.get(ch.tag, 0)) for ch in CHARACTERS]
    return rows


def write_selected_tags(path: Path, rows: list[tuple[str, int, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, n) in enumerate(rows):
            wr.writerow([i, name, cat, n])


def blob_image(rng: random.Random) -> Image.Image:
    """Random soft colour blobs: what an untrained generator decodes to; carries no character."""
    w, h = rng.choice([(64, 64), (96, 96), (128, 96), (96, 128)])
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 8)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.4) * w
        d.ellipse([x - r, y - r * rng.uniform(0.5, 2), x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 4)))


def vae_roundtrip(vae: nn.Module, img: Image.Image) -> Image.Image:
    """The image after VAE encode (posterior mean) and decode: what any generated image looks like."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, H, W)
    with torch.no_grad():
        return to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample[0])


def latent_stats(vae: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, each (C,), of the VAE's posterior means over one render per character."""
    ref = [render(random_scene(ch, random.Random(i))).resize((64, 64)) for i, ch in enumerate(CHARACTERS)]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in ref])  # (12, 64, 64, 3)
    with torch.no_grad():
        z = vae.encode(x.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean  # (12, C, 8, 8)
    return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))


def vae_noise_image(vae: nn.Module, stats: tuple[torch.Tensor, torch.Tensor], rng: random.Random) -> Image.Image:
    """The decode of random latents with the VAE's own per-channel statistics (`latent_stats`): the
    texture an untrained generator produces; carries no character."""
    w, h = rng.choice([(64, 64), (96, 96), (128, 96), (96, 128)])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    mu, sd = stats
    # smoothness varies: white noise up to blobs 4 latent pixels wide, like early generator outputs
    k = rng.choice([1, 2, 4])
    z = torch.randn(1, mu.numel(), -(-h // (8 * k)), -(-w // (8 * k)), generator=g)
    z = F.interpolate(z, scale_factor=k, mode="bilinear")[..., : h // 8, : w // 8]  # (1, C, h/8, w/8)
    z = z / z.flatten(2).std(2)[..., None, None] * sd[None, :, None, None] + mu[None, :, None, None]
    with torch.no_grad():
        return to_pil(vae.decode(z).sample[0])


def _dataset(
    scenes: list[Scene | None], index: dict[str, int], seed: int, size: int, desc: str,
    vae: nn.Module | None = None, vae_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes (None: a random-blob negative) -> inputs (N, S, S, 3) BGR 0..255, targets (N, T).
    With `vae`, a `vae_fraction` of the images is replaced by its VAE round trip."""
    rng = random.Random(seed)
    stats = latent_stats(vae) if vae is not None else None
    xs, ys = [], []
    for scene in tqdm(scenes, desc=desc, unit="img", leave=False):
        y = np.zeros(len(index), np.float32)
        y[index[RATING]] = 1.0
        if scene is None and vae is not None and stats is not None and rng.random() < 0.5:
            img = vae_noise_image(vae, stats, rng)
        elif scene is None:
            img = blob_image(rng)
        else:
            img = render(scene)
            tags = scene_tags(scene, rng)
            for t in [*tags["general"], *tags["character"]]:
                y[index[t]] = 1.0
        if vae is not None and rng.random() < vae_fraction:
            img = vae_roundtrip(vae, img)
        xs.append(wd_preprocess(img, size))  # (S, S, 3) BGR 0..255, padded to square on white
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _scenes(per_character: int, negatives: int, seed: int) -> tuple[list[Scene | None], list[int]]:
    """Balanced scenes, character index per scene (-1 for negatives); half the negatives are scenery."""
    rng = random.Random(f"tagger-scenes:{seed}")
    scenes: list[Scene | None] = []
    labels = []
    for ci, ch in enumerate(CHARACTERS):
        for _ in range(per_character):
            scenes.append(random_scene(ch, rng))
            labels.append(ci)
    for i in range(negatives):
        scenes.append(random_scene(None, rng) if i % 2 == 0 else None)
        labels.append(-1)
    return scenes, labels


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x: (B, S, S, 3) 0..255 -> blurred (random strength), colour-jittered, noisy copy."""
    b = x.shape[0]
    img = x.permute(0, 3, 1, 2)  # (B, 3, S, S)
    sigma = torch.rand(b, generator=g) * 1.5  # (B,) blur std in pixels at the model's input size
    k = torch.arange(-3, 4, dtype=torch.float32)  # (7,)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 7)
    kern = kern / kern.sum(1, keepdim=True)
    flat = img.reshape(1, b * 3, *img.shape[2:])  # grouped conv: one kernel per image
    kh = kern.repeat_interleave(3, 0)  # (B*3, 7)
    flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), kh[:, None, None, :], groups=b * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"), kh[:, None, :, None], groups=b * 3)
    img = flat.reshape_as(img)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.2  # +-10% per channel
    img = img * gain + torch.randn(img.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 12
    return img.clamp(0, 255).permute(0, 2, 3, 1)  # (B, S, S, 3)


def character_accuracy(model: nn.Module, x: torch.Tensor, labels: list[int], char_cols: list[int]) -> float:
    """Share of character images whose highest-scoring character tag is the right one."""
    with torch.no_grad():
        p = model(x)[:, char_cols]  # (N, n_chars)
    lab = torch.tensor(labels)
    keep = lab >= 0
    return float((p.argmax(1)[keep] == lab[keep]).float().mean())


def train_tagger(
    out_dir: str | Path, world: WorldConfig, cfg: TaggerConfig | None = None, vae_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train, export `model.onnx` + `selected_tags.csv` into out_dir, return held-out metrics. With
    `vae_dir` (a diffusers AutoencoderKL trained on the world), part of the training images are VAE
    round trips, so the tagger reads decoded (generated) images as well as renders; the held-out
    accuracy is then also reported on round trips."""
    cfg = cfg or TaggerConfig()
    vae = None
    if vae_dir is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    # vocabulary from a large tag-only sample of the world (tags cost nothing to draw)
    vocab_rng = random.Random(f"tagger-vocab:{world.seed}")
    vocab_scenes = [random_scene(ch, vocab_rng) for ch in CHARACTERS for _ in range(50)]
    vocab_scenes += [random_scene(None, vocab_rng) for _ in range(50)]
    rows = tag_vocabulary([scene_tags(s, vocab_rng) for s in vocab_scenes])
    index = {name: i for i, (name, _, _) in enumerate(rows)}
    char_cols = [index[ch.tag] for ch in CHARACTERS]

    scenes, labels = _scenes(cfg.per_character, cfg.negatives, world.seed)
    x, y = _dataset(scenes, index, world.seed, cfg.size, "tagger train renders", vae, cfg.vae_fraction)
    h_scenes, h_labels = _scenes(cfg.heldout_per_character, cfg.heldout_per_character, world.seed + 10_000)
    hx, _ = _dataset(h_scenes, index, world.seed + 10_000, cfg.size, "tagger held-out renders")

    model = TaggerNet(len(rows), cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc="tagger training", unit="step", leave=False)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = augment(x[idx], g)  # (b, S, S, 3)
            loss = F.binary_cross_entropy_with_logits(model.logits(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    hg = torch.Generator().manual_seed(cfg.seed + 1)
    report = {
        "heldout_char_accuracy": character_accuracy(model, hx, h_labels, char_cols),
        "heldout_char_accuracy_augmented": character_accuracy(model, augment(hx, hg), h_labels, char_cols),
        "heldout_images": sum(1 for v in h_labels if v >= 0),
        "n_tags": len(rows),
        "input_size": cfg.size,
    }
    with torch.no_grad():
        neg = torch.tensor(h_labels) < 0
        report["heldout_negative_max_char_prob_mean"] = float(model(hx[neg])[:, char_cols].max(1).values.mean())
    if vae is not None:  # the same held-out scenes after a VAE round trip
        vx, _ = _dataset(h_scenes, index, world.seed + 10_000, cfg.size, "tagger held-out VAE round trips", vae, 1.0)
        report["heldout_char_accuracy_vae_roundtrip"] = character_accuracy(model, vx, h_labels, char_cols)
    export_onnx(model, out / "model.onnx", cfg.size)
    write_selected_tags(out / "selected_tags.csv", rows)
    return report


def export_onnx(model: nn.Module, path: Path, size: int) -> None:
    """Write the WD graph: input `input_1` (batch, S, S, 3) float32, output `predictions_sigmoid`."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            model,
            (torch.zeros(1, size, size, 3),),
            str(path),
            dynamo=False,  # the TorchScript exporter needs no onnxscript and writes one self-contained file
            input_names=["input_1"],
            output_names=["predictions_sigmoid"],
            dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
            opset_version=17,
        )
