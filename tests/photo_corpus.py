"""A realistic source folder for the data scripts, built from real photographs that ship inside
scikit-image's wheel (skimage.data's own files, read with PIL; nothing is downloaded): the formats and
modes users' folders hold, files whose extension lies, formats the shards do not store as they are,
and broken input of every kind, each with its caption / json sidecars.

    corpus = build_corpus(tmp_path / "src")
    corpus.good       # {relative path: photo it shows}: delivered by the loader, pixels = PIL's decode
    corpus.refused    # {relative path of the file at fault: reason make_shards refuses it for}
    corpus.skipped    # {relative path: reason the loader skips it for (found only at full decode etc.)}
    corpus.converted  # {relative path: PIL format} stored as PNG by make_shards

Every good image is resized to a bucket of BUCKETS (DataConfig fields) that assign_bucket maps to
itself, so the loader never resizes it: its pixels can be compared exactly with PIL's decode of the
file (EXIF transpose, alpha on white).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

from lumina_illus.config import DataConfig
from lumina_illus.data.buckets import all_buckets, assign_bucket

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE_DIR = Path(skimage.data.__file__).parent  # the photographs inside the installed wheel
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg",
          "motorcycle_left.png")
# small buckets (24..192 px sides, aspects up to 4:1) so that the corpus decodes in well under a second
BUCKETS = dict(min_area=32 * 32, max_area=96 * 96, area_step=16, bucket_step=8, patch_tokens_per_side=8,
               max_aspect=4.0, skip_aspect=6.0, min_side=16)
# PIL's Image.transpose method that undoes EXIF orientation o (what exif_transpose applies is its inverse)
_UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """data/<script> as a user runs it (fresh interpreter, offline, one thread), whatever its exit status."""
    return subprocess.run([sys.executable, str(ROOT / "data" / script), *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=300)


@dataclass
class Corpus:
    root: Path
    good: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)  # good image -> the exact .txt caption the shard holds


def exact_buckets() -> list[tuple[int, int]]:
    """Buckets (h, w) that assign_bucket maps to themselves under BUCKETS: images of these sizes are never resized."""
    cfg = DataConfig(**BUCKETS)
    out = [b for b in all_buckets(cfg) if assign_bucket(cfg, *b) == b]
    assert len(out) > 20, out
    return out


def photo(name: str, h: int, w: int) -> Image.Image:
    """A real photograph, centre-cropped to aspect w:h and resized to w x h (RGB, or L for grayscale ones)."""
    with Image.open(SKIMAGE_DIR / name) as im:
        im.load()
    return ImageOps.fit(im, (w, h), Image.Resampling.LANCZOS)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def build_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True)
    c = Corpus(root)
    sizes = exact_buckets()
    counter = iter(range(10**6))

    def sidecars(rel: str, caption: str | None, tags: bool) -> None:
        stem = (root / rel).with_suffix("")
        if caption is not None:
            stem.with_suffix(".txt").write_text(caption, encoding="utf-8")
        if tags:
            stem.with_suffix(".json").write_text(json.dumps({"tags": {"general": ["photo", Path(rel).stem]}}))

    def good(rel: str, data: bytes, source: str, *, caption: bool = True, tags: bool = True) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        text = f"a photograph ({source}), {rel}" if caption else None
        sidecars(rel, text, tags)
        c.good[rel] = source
        if text is not None:
            c.captions[rel] = text

    def next_photo(mode: str = "RGB") -> tuple[Image.Image, str]:
        i = next(counter)
        h, w = sizes[(i * 7) % len(sizes)]
        name = PHOTOS[i % len(PHOTOS)]
        return photo(name, h, w).convert(mode), name

    # JPEG: baseline, progressive, grayscale, CMYK, EXIF orientations 1-8 (stored so that the transposed
    # image has a bucket's size)
    im, src = next_photo()
    good("jpeg/baseline.jpg", encode(im, "JPEG", quality=90), src)
    im, src = next_photo()
    good("jpeg/progressive.jpg", encode(im, "JPEG", quality=85, progressive=True), src, tags=False)
    im, src = next_photo("L")
    good("jpeg/grayscale.jpeg", encode(im, "JPEG", quality=90), src, caption=False)
    im, src = next_photo("CMYK")
    good("jpeg/cmyk.jpg", encode(im, "JPEG", quality=90), src)
    for o in range(1, 9):
        im, src = next_photo()
        exif = Image.Exif()
        exif[0x0112] = o
        stored = im.transpose(_UNDO[o]) if o in _UNDO else im
        good(f"jpeg/exif_orientation_{o}.jpg", encode(stored, "JPEG", quality=90, exif=exif.tobytes()), src)

    # PNG: RGBA with partial transparency, palette, palette with a transparent index, 1-bit, 16-bit, LA
    im, src = next_photo()
    alpha = Image.linear_gradient("L").resize(im.size)  # 0 .. 255 from top to bottom
    good("png/rgba.png", encode(Image.merge("RGBA", (*im.split(), alpha)), "PNG"), src)
    im, src = next_photo()
    good("png/palette.png", encode(im.quantize(64), "PNG"), src, tags=False)
    im, src = next_photo()
    pal = im.quantize(32)
    good("png/palette_transparent.png", encode(pal, "PNG", transparency=int(np.asarray(pal)[0, 0])), src)
    im, src = next_photo("L")
    good("png/bilevel.png", encode(im.convert("1"), "PNG"), src)
    im, src = next_photo("L")
    a16 = np.asarray(im, dtype=np.uint16) * 257 + np.random.default_rng(0).integers(0, 257, im.size[::-1], dtype=np.uint16)
    good("png/16bit.png", encode(Image.fromarray(a16), "PNG"), src)
    im, src = next_photo("L")
    good("png/gray_alpha.png", encode(Image.merge("LA", (im, alpha.resize(im.size).transpose(Image.Transpose.ROTATE_180))),
                                      "PNG"), src, caption=False)

    # WebP: lossy, lossless with alpha, animated (the first frame is the image)
    im, src = next_photo()
    good("webp/lossy.webp", encode(im, "WEBP", quality=80), src)
    im, src = next_photo()
    good("webp/lossless_alpha.webp", encode(Image.merge("RGBA", (*im.split(), alpha.resize(im.size))), "WEBP",
                                            lossless=True), src)
    im, src = next_photo()
    good("webp/animated.webp", encode(im, "WEBP", save_all=True, append_images=[im.transpose(Image.Transpose.ROTATE_180)],
                                      duration=100, lossless=True), src)

    # extensions that lie; a folder named like an image (walked like any folder)
    im, src = next_photo()
    good("lies/png_named.jpg", encode(im, "PNG"), src)
    im, src = next_photo()
    good("lies/jpeg_named.png", encode(im, "JPEG", quality=90), src)
    im, src = next_photo()
    good("folder.jpg/inside.webp", encode(im, "WEBP", quality=90), src)

    # formats PIL reads that shards do not store as they are: converted to PNG (first frame)
    for rel, mode, fmt, kw in (("other/animated.gif", "P", "GIF", {"save_all": True, "duration": 100}),
                               ("other/transparent.gif", "P", "GIF", {"transparency": 0}),
                               ("other/picture.bmp", "RGB", "BMP", {}),
                               ("other/scan.tiff", "RGB", "TIFF", {"compression": "tiff_lzw"}),
                               ("other/print.tif", "CMYK", "TIFF", {})):
        im, src = next_photo()
        if kw.get("save_all"):
            kw = {**kw, "append_images": [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert(mode)]}
        good(rel, encode(im.convert(mode), fmt, **kw), src)
        c.converted[rel] = fmt

    # sidecars with byte-order marks: fine, the mark is not content
    im, src = next_photo()
    good("sidecars/caption_bom.jpg", encode(im, "JPEG"), src, tags=False)
    (root / "sidecars/caption_bom.txt").write_text("\ufeffa caption saved by Notepad", encoding="utf-8")
    c.captions["sidecars/caption_bom.jpg"] = "a caption saved by Notepad"
    im, src = next_photo()
    good("sidecars/json_bom.png", encode(im, "PNG"), src, caption=False)
    (root / "sidecars/json_bom.json").write_text(json.dumps({"tags": {"character": ["someone"]}}), encoding="utf-8-sig")

    # ---- broken input (each with sidecars, as a user's folder has them)
    bad = root / "bad"
    bad.mkdir()
    rng = np.random.default_rng(1)

    def broken(rel: str, data: bytes | None, reason: str, *, loader: bool = False, caption: str | None = "x",
               tags: bool = True) -> None:
        if data is not None:
            (root / rel).write_bytes(data)
        sidecars(rel, caption, tags)
        (c.skipped if loader else c.refused)[rel] = reason

    im, _ = next_photo()
    jpg, png = encode(im, "JPEG", quality=90), encode(im, "PNG")
    webp, webp_ll = encode(im, "WEBP", quality=80), encode(im.convert("RGBA"), "WEBP", lossless=True)
    broken("bad/zero_bytes.jpg", b"", "empty_file")
    broken("bad/random_bytes.png", rng.bytes(3000), "corrupt_image")
    broken("bad/text_named.webp", b"this is a text file\n" * 20, "corrupt_image")
    broken("bad/random_bytes.dat", rng.bytes(500), "unsupported_type")
    broken("bad/readme.md", b"# notes about my dataset\n", "unsupported_type", caption=None, tags=False)
    broken("bad/multipage_rgb.tif", (SKIMAGE_DIR / "multipage_rgb.tif").read_bytes(), "unsupported_type")  # a real TIFF PIL cannot read
    broken("bad/fake.gif", b"GIF89a" + rng.bytes(200), "unsupported_type")
    crc = bytearray(png)
    crc[29] ^= 0xFF  # the IHDR checksum
    broken("bad/bad_crc.png", bytes(crc), "corrupt_image")
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # 60000 x 60000 RGB claimed, a few bytes of data
    broken("bad/huge_header.png", png[:8] + png_chunk(b"IHDR", ihdr) + png[33:], "too_large")
    for frac, reason, loader in ((0.05, "truncated_image", False), (0.4, "truncated_image", True),
                                 (0.9, "truncated_image", True)):
        broken(f"bad/jpeg_cut_{int(frac * 100)}.jpg", jpg[: int(len(jpg) * frac)], reason, loader=loader)
    broken("bad/png_cut_in_header.png", png[:20], "truncated_image")
    broken("bad/png_cut_after_header.png", png[:40], "corrupt_image")
    broken("bad/png_cut_in_data.png", png[: len(png) // 2], "truncated_image")
    broken("bad/webp_cut_in_header.webp", webp[:20], "corrupt_image")
    broken("bad/webp_cut_in_data.webp", webp[: len(webp) // 2], "corrupt_image")
    broken("bad/webp_lossless_cut.webp", webp_ll[: len(webp_ll) * 3 // 4], "corrupt_image")
    gif = encode(im.convert("P"), "GIF")
    broken("bad/gif_cut.gif", gif[: len(gif) // 2], "truncated_image")
    (bad / "dangling.png").symlink_to(bad / "does_not_exist.png")
    broken("bad/dangling.png", None, "not_a_file")

    # good images, bad sidecars: the sidecar is the file at fault
    for stem, content, reason in (("json_not_json", b'{"tags": ["a",', "bad_json"),
                                  ("json_array", b"[1, 2, 3]", "bad_json"),
                                  ("json_latin1", '{"tags": ["café"]}'.encode("latin-1"), "bad_json"),
                                  ("json_bucket_word", b'{"bucket": "portrait", "tags": ["a"]}', "bad_json"),
                                  ("json_width_text", b'{"width": "wide", "height": 64, "tags": ["a"]}', "bad_json"),
                                  ("json_tags_string", b'{"tags": {"general": "smile, hat"}}', "bad_json"),
                                  ("json_tags_numbers", b'{"tags": {"general": [1, 2]}}', "bad_json")):
        (bad / f"{stem}.png").write_bytes(png)
        (bad / f"{stem}.json").write_bytes(content)
        c.refused[f"bad/{stem}.json"] = reason
    (bad / "caption_latin1.png").write_bytes(png)
    (bad / "caption_latin1.txt").write_bytes("une photo d'été".encode("latin-1"))
    c.refused["bad/caption_latin1.txt"] = "bad_caption_encoding"

    # accepted by make_shards (the header is fine), skipped by the loader
    im, _ = next_photo()
    broken("bad/no_caption.png", encode(im, "PNG"), "missing_caption", loader=True, caption=None, tags=False)
    broken("bad/tiny.png", encode(photo("coffee.png", 12, 12), "PNG"), "too_small", loader=True)
    broken("bad/too_wide.png", encode(photo("rocket.jpg", 20, 200), "PNG"), "bad_aspect", loader=True)
    return c


def refused_images(c: Corpus) -> dict[str, str]:
    """Image file -> the file at fault for every refusal (a sidecar refuses its image)."""
    out = {}
    for rel in c.refused:
        if rel.endswith((".txt", ".json")):
            stem = rel.rsplit(".", 1)[0]
            out[next(p for p in (f"{stem}.png", f"{stem}.jpg") if (c.root / p).exists())] = rel
        else:
            out[rel] = rel
    return out


def reference_rgb(path: Path) -> np.ndarray:
    """PIL's own decode of an image file as the loader documents it (lumina_illus/data/decode.py): first
    frame, EXIF orientation applied, 16-bit scaled to 8, transparency composited on white; (H, W, 3) uint8."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64) / 65535.0 * 255.0
        return np.repeat(np.floor(a + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
