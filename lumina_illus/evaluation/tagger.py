"""WD-tagger-format image classifier (SmilingWolf's WD v3 layout) run with onnxruntime.

A tagger folder holds `model.onnx` (input NHWC float32, BGR, 0..255, square) and `selected_tags.csv`
(`tag_id,name,category,count`; category 4 = character, 0 = general, 9 = rating). The model outputs one
probability per row of the CSV (the v3 graphs end in a sigmoid).

    tagger = WDTagger("wd-swinv2-tagger-v3")
    probs = tagger.predict([img1, img2])       # (2, n_tags) float32
    probs[:, tagger.index("hatsune_miku")]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lumina_illus.evaluation.csv_rows import int_field, read_rows, text_field

CATEGORY_GENERAL = 0
CATEGORY_CHARACTER = 4
CATEGORY_RATING = 9


@dataclass(frozen=True)
class Tag:
    name: str  # danbooru-style tag, underscores kept ("hatsune_miku")
    category: int  # 0 general, 4 character, 9 rating


def load_tags(path: str | Path) -> list[Tag]:
    """Rows of a WD `selected_tags.csv` in model output order; errors name the file, line and field."""
    rows = read_rows(path, ("name", "category"), "WD tag list (selected_tags.csv)")
    return [Tag(text_field(path, line, row, "name"), int_field(path, line, row, "category")) for line, row in rows]


def wd_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """WD v3 preprocessing of one image -> (size, size, 3) float32, BGR, 0..255.

    Steps (as in SmilingWolf's wd-tagger app): 1. composite transparency onto white; 2. pad to a
    square on white, image centred (left/top offset = floor of half the padding); 3. bicubic resize to
    the model's input side; 4. RGB -> BGR, float32 without normalisation.
    """
    # 1. alpha onto white
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB")
    # 2. pad to square
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    # 3. resize
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    # 4. BGR float
    arr = np.asarray(square, dtype=np.float32)  # (size, size, 3) RGB
    return np.ascontiguousarray(arr[:, :, ::-1])  # (size, size, 3) BGR


class WDTagger:
    """A WD-format tagger folder loaded into an onnxruntime CPU/CUDA session."""

    def __init__(self, folder: str | Path, threads: int = 1, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        model = self.folder / "model.onnx"
        if not model.is_file():
            raise FileNotFoundError(f"{model}: tagger model not found (--tagger must be a WD tagger folder)")
        self.tags = load_tags(self.folder / "selected_tags.csv")
        self._index = {t.name: i for i, t in enumerate(self.tags)}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        self.session = ort.InferenceSession(str(model), opts, providers=chosen)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape  # [batch, H, W, 3]; batch may be symbolic
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{model}: input {inp.name} has shape {shape}; expected NHWC [N, S, S, 3]")
        self.size = int(shape[1])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise ValueError(f"{model}: {n_out} outputs but {len(self.tags)} tags in selected_tags.csv")

    def index(self, tag: str) -> int:
        """Output column of `tag`; a clear error when the tagger does not know it."""
        if tag not in self._index:
            raise KeyError(f"tag {tag!r} is not in {self.folder / 'selected_tags.csv'}")
        return self._index[tag]

    def category(self, tag: str) -> int:
        return self.tags[self.index(tag)].category

    def predict(self, images: Sequence[Image.Image], batch_size: int = 16) -> np.ndarray:
        """Per-tag probabilities, (len(images), n_tags) float32."""
        step = self.fixed_batch or batch_size
        out = []
        for i in range(0, len(images), step):
            x = np.stack([wd_preprocess(im, self.size) for im in images[i : i + step]])  # (b, S, S, 3)
            b = len(x)
            if self.fixed_batch and b < self.fixed_batch:  # fixed-batch graphs: pad with white, drop after
                x = np.concatenate([x, np.full((self.fixed_batch - b, *x.shape[1:]), 255, np.float32)])
            out.append(self.session.run(None, {self.input_name: x})[0][:b])  # (b, n_tags)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.tags)), np.float32)
