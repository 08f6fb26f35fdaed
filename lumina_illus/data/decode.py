"""Image decoding that survives what illustration datasets contain: EXIF rotation, grayscale,
palette, CMYK, 16-bit, transparency (composited on white), truncated or corrupt files.

`open_image` reads only the header (size after EXIF rotation) so the bucket is known before the
pixels are decoded; `load_rgb` then decodes with JPEG draft mode (DCT-domain downscaling) when
the bucket is much smaller than the file, which is most of the decode cost saved.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

# EXIF orientations 5-8 swap width and height
_SWAPS = {5, 6, 7, 8}


class DecodeError(ValueError):
    """The image bytes are empty, truncated or not an image; `reason` is the skip-count key."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def _reason(e: Exception) -> str:
    # PIL says "image file is truncated" (PNG chunks, JPEG scans); everything else is corruption
    return "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"


def open_image(data: bytes) -> tuple[Image.Image, int, int]:
    """Open lazily; returns (image, height, width) with height/width after EXIF orientation."""
    if not data:
        raise DecodeError("empty_file", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise DecodeError(_reason(e), f"cannot open image: {e}") from None
    if orientation in _SWAPS:
        w, h = h, w
    return img, h, w


def load_rgb(img: Image.Image, min_height: int = 0, min_width: int = 0) -> Image.Image:
    """Decode an image from `open_image` to 8-bit RGB, EXIF-rotated, alpha composited on white.
    min_height/min_width (after rotation) allow JPEG draft downscaling to no less than that."""
    try:
        if img.format == "JPEG" and min_height and min_width:
            orientation = img.getexif().get(0x0112, 1)
            req = (min_height, min_width) if orientation in _SWAPS else (min_width, min_height)
            img.draft(img.mode if img.mode in ("RGB", "L") else None, req)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(_reason(e), f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0  # "I" holds 8- or 16-bit data
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa") or (mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)
