"""Known-truth components for the evaluation tests, and checks that they behave as designed.

- `build_toy_tagger(dir)`: a WD-format tagger folder (model.onnx exported from a hand-built torch
  classifier + selected_tags.csv). Character k's probability is a sigmoid of the share of pixels close
  to the character's colour, so a disk of that colour is tagged and anything else is not.
- `ShapeGenerator`: a real `families.Generator` that draws the character's colour disk when it "knows"
  the character for that (size, seed), a grey disk otherwise; it records every prompt it renders.
  Its `trajectory` interpolates noise -> a known target in pixel space (latents = image in [-1, 1]).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(1)

TAGGER_SIZE = 32
COLOURS = {  # character tag -> RGB
    "alice": (230, 20, 20),
    "bob": (20, 200, 40),
    "carol": (30, 60, 230),
    "dave": (240, 200, 20),
}
GREY = (128, 128, 128)
TAGS = [("general", 9), ("white_background", 0), *[(name, 4) for name in COLOURS]]


class _ColourShareTagger(torch.nn.Module):
    """(N, S, S, 3) BGR 0..255 -> (N, n_tags) probabilities; known truth, no training."""

    def __init__(self):
        super().__init__()
        bgr = torch.tensor([c[::-1] for c in COLOURS.values()], dtype=torch.float32)  # (K, 3)
        self.register_buffer("colours", bgr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = ((x[:, :, :, None, :] - self.colours) ** 2).sum(-1) / (3 * 255.0**2)  # (N, S, S, K)
        share = torch.exp(-d / 0.005).mean(dim=(1, 2))  # (N, K) share of pixels near each colour
        chars = torch.sigmoid(60 * (share - 0.03))  # (N, K)
        white = (x >= 254.5).all(-1).float().mean(dim=(1, 2))  # (N,) share of pure white pixels
        rating = torch.full_like(white, 0.9)  # (N,) "general" rating
        return torch.cat([rating[:, None], white[:, None], chars], dim=1)  # (N, 2 + K)


def build_toy_tagger(folder: Path, size: int = TAGGER_SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _ColourShareTagger(), (torch.zeros(1, size, size, 3),), str(folder / "model.onnx"),
        input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    with (folder / "selected_tags.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(TAGS):
            w.writerow([1000 + i, name, cat, 100])
    return folder


def draw_disk(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    w, h = size
    im = Image.new("RGB", (w, h), (255, 255, 255))
    r = 0.4 * min(w, h)
    ImageDraw.Draw(im).ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=colour)
    return im


Skill = Callable[[str, tuple[int, int], int], bool]  # (character tag, size, seed) -> drawn correctly?


class ShapeGenerator:
    def __init__(self, skill: Skill):
        self.skill = skill
        self.calls: list[tuple[str, tuple[int, int], int]] = []

    def generate(self, prompts, sizes, seeds, steps=None, guidance=None, negative_prompt="", progress=False):
        out = []
        for prompt, size, seed in zip(prompts, sizes, seeds):
            self.calls.append((prompt, tuple(size), seed))
            tag = next((t for t in COLOURS if f"trigger_{t}" in prompt), None)
            known = tag is not None and self.skill(tag, tuple(size), seed)
            out.append(draw_disk(tuple(size), COLOURS[tag] if known else GREY))
        return out

    def trajectory(self, prompt: str, size: tuple[int, int], seed: int, steps: int, guidance: float) -> list[dict[str, Any]]:
        """Euler steps of the exact flow noise -> target (a black image with a faint fine grid)."""
        w, h = size
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(3, h, w, generator=g)  # (3, h, w)
        target = torch.full((3, h, w), -1.0)  # (3, h, w) black
        target[:, ::4, ::4] = -0.8  # a little high-frequency content
        out = []
        for i in range(steps):
            t = i / steps
            x = t * target + (1 - t) * noise  # (3, h, w)
            out.append({"t": t, "x": x, "x0": target.clone()})
        return out

    def decode(self, latents: torch.Tensor) -> Image.Image:
        arr = ((latents.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (h, w, 3)
        return Image.fromarray(arr)


@pytest.fixture(scope="session")
def toy_tagger_dir(tmp_path_factory) -> Path:
    return build_toy_tagger(tmp_path_factory.mktemp("tagger"))


def test_toy_tagger_sees_the_disk_colour(toy_tagger_dir):
    from lumina_illus.evaluation.tagger import WDTagger

    tagger = WDTagger(toy_tagger_dir)
    assert tagger.size == TAGGER_SIZE
    sizes = [(64, 64), (48, 80), (96, 40)]
    imgs = [draw_disk(s, c) for s in sizes for c in [*COLOURS.values(), GREY]]
    p = tagger.predict(imgs, batch_size=4)  # (15, 6)
    assert p.shape == (len(imgs), len(TAGS))
    k = len(COLOURS) + 1
    for si in range(len(sizes)):
        for ci, tag in enumerate(COLOURS):
            row = p[si * k + ci]
            assert row[tagger.index(tag)] > 0.85, (sizes[si], tag, row)
            others = [tagger.index(t) for t in COLOURS if t != tag]
            assert (row[others] < 0.2).all()
        assert (p[si * k + len(COLOURS), 2:] < 0.2).all()  # grey disk: no character
    assert (p[:, tagger.index("white_background")] > 0.4).all()


def test_shape_generator_is_a_generator():
    from lumina_illus.families import Generator

    assert isinstance(ShapeGenerator(lambda *a: True), Generator)
