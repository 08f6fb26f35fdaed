"""A user's source folder as the data scripts read it (data/make_shards.py, data/annotate_colors.py):
which files are images and which are sidecars, strict reading of images, captions and json sidecars,
the check of the sidecar fields the pipeline reads, and the report of refused files that every data
script prints and writes.

    folder = scan_folder(root)                 # every file that is not a .txt/.json sidecar is an image
    refusals = Refusals()
    for path in folder.images:
        try:
            img = read_image(path)             # SourceImage; other formats PIL reads become PNG
            caption = read_caption(path.with_suffix(".txt"))
        except Refused as e:
            refusals.add(e.path, e.reason, str(e), sample=path)
    sys.exit(refusals.finish(out_dir / REFUSED, usable=n, strict=args.strict))

A refusal names the file at fault (the image, its .txt or its .json) and its reason (FILE_REASONS);
the script goes on with the next file.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from lumina_illus.data.decode import DecodeError, open_image, to_rgb

SIDECAR_EXTS = ("txt", "json")
SIDECAR_TMP = tuple(f".{ext}.tmp" for ext in SIDECAR_EXTS)  # the temporary names sidecars are written under
REFUSED = "refused.json"  # the report's file name, beside the script's output

# image formats stored in shards as they are (bytes unchanged), by the field they are stored under
FIELD_OF_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# modes PNG stores unchanged; other formats' images in other modes are stored as the loader decodes them
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")

# what reading a source file can be refused for (the loader's reasons, lumina_illus/data/reasons.py,
# are used as they are where they mean the same: empty_file, corrupt_image, bad_json, ...)
FILE_REASONS = (
    "missing_file",  # an index row names a file that is not there
    "not_a_file",  # neither a folder nor a regular file (a broken link, a socket)
    "read_error",  # the file could not be read (permissions, I/O)
    "unsupported_type",  # not an image format PIL can read (and not named .jpg/.jpeg/.png/.webp)
    "empty_file",  # zero-byte image
    "corrupt_image",  # named like an image but not decodable
    "truncated_image",  # the image stops early
    "too_large",  # more pixels than PIL's decompression-bomb limit (the loader would refuse it too)
    "bad_caption_encoding",  # .txt not valid UTF-8 (never mangled with replacement characters)
    "bad_json",  # .json unreadable, not an object, or a field of the wrong type (the field is named)
)


class Refused(ValueError):
    """One input file refused: `reason` (FILE_REASONS) and the file at fault (`path`)."""

    def __init__(self, reason: str, msg: str, path: str | Path | None = None):
        assert reason in FILE_REASONS, reason
        super().__init__(msg)
        self.reason, self.path = reason, None if path is None else str(path)

    def __reduce__(self) -> tuple:  # crosses process pools intact (the default pickles only the message)
        return Refused, (self.reason, str(self), self.path)


# ---- the folder


@dataclass
class Folder:
    images: list[Path]  # every entry that is neither a folder nor a sidecar, sorted (the images to try)
    unused_sidecars: list[Path]  # .txt/.json files without an image of the same stem (not read)


def scan_folder(root: Path, exclude: Path | None = None) -> Folder:
    """Every entry under `root` (recursively; `exclude`, e.g. an output folder inside it, is left out).
    A folder named like an image (`x.jpg/`) is walked like any folder. Sidecars being written (`x.json.tmp`,
    then renamed) are left out, so that ranks scanning while others write see the same images."""
    exclude = exclude.resolve() if exclude is not None else None
    images, sidecars = [], []
    for p in sorted(root.rglob("*")):
        if exclude is not None and p.resolve().is_relative_to(exclude):
            continue
        if p.is_dir() or p.name.endswith(SIDECAR_TMP):
            continue  # a sidecar being written by another process (data/annotate_colors.py's ranks)
        if p.suffix.lower()[1:] in SIDECAR_EXTS and p.is_file():
            sidecars.append(p)
        else:
            images.append(p)
    stems = {p.with_suffix("") for p in images}
    return Folder(images, [p for p in sidecars if p.with_suffix("") not in stems])


def sidecar(image: Path, ext: str) -> Path | None:
    """The image's `.txt` / `.json` (same stem), or None."""
    p = image.with_suffix(f".{ext}")
    return p if p.is_file() else None


# ---- images


@dataclass
class SourceImage:
    field: str  # shard field: "jpg" | "png" | "webp" (by content, whatever the file name says)
    data: bytes  # the file's bytes, or PNG bytes of its first frame for other formats
    height: int  # after EXIF orientation
    width: int
    converted_from: str | None  # the PIL format name when the bytes were converted to PNG


def read_bytes(path: Path) -> bytes:
    if not path.exists() and not path.is_symlink():
        raise Refused("missing_file", "no such file", path)
    if not path.is_file():
        raise Refused("not_a_file", "not a regular file (a broken link?)", path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise Refused("read_error", f"{type(e).__name__}: {e}", path) from None


def open_source(path: Path) -> tuple[Image.Image, int, int, bytes]:
    """(lazily opened image, height, width after EXIF orientation, file bytes); raises Refused."""
    data = read_bytes(path)
    try:
        img, h, w = open_image(data)
    except DecodeError as e:
        reason = _refusal_reason(path, data, e)
        msg = f"not an image format PIL can read ({e})" if reason == "unsupported_type" else str(e)
        raise Refused(reason, msg, path) from None
    return img, h, w, data


def _refusal_reason(path: Path, data: bytes, e: DecodeError) -> str:
    try:
        Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return "too_large"
    except Exception:
        pass
    if e.reason == "corrupt_image" and path.suffix.lower()[1:] not in ("jpg", "jpeg", "png", "webp"):
        return "unsupported_type"  # a .gif that PIL reads is converted; anything it cannot read ends here
    return e.reason


def read_image(path: Path) -> SourceImage:
    """The image as a shard stores it: JPEG, PNG and WebP bytes unchanged (under the field of their real
    format, whatever the extension says); any other format PIL reads (GIF, BMP, TIFF, ...) as PNG of its
    first frame, EXIF orientation applied, pixels unchanged where PNG holds the mode (else as the loader
    would decode them: 8-bit RGB, alpha on white). Raises Refused."""
    img, h, w, data = open_source(path)
    fmt = img.format or "unknown"
    fld = FIELD_OF_FORMAT.get(fmt)
    if fld is not None:
        return SourceImage(fld, data, h, w, None)
    try:
        img.seek(0)
        img.load()
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode not in _PNG_MODES:
            img = to_rgb(img)
        buf = io.BytesIO()
        img.save(buf, "PNG")
    except Exception as e:  # PIL raises many types for a file that opens but does not decode
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise Refused(reason, f"cannot decode {fmt} image: {e}", path) from None
    return SourceImage("png", buf.getvalue(), h, w, fmt)


# ---- captions and json sidecars


def read_caption(path: Path) -> str:
    """A caption .txt: strict UTF-8, a leading byte-order mark removed. Raises Refused."""
    try:
        return read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Refused("bad_caption_encoding", f"not valid UTF-8 ({e}); save it as UTF-8", path) from None


def read_json_sidecar(path: Path) -> dict[str, Any]:
    """A json sidecar: UTF-8 (a byte-order mark allowed), an object, fields of the right types (check_meta).
    Raises Refused("bad_json") naming the file and the field."""
    try:
        meta = json.loads(read_bytes(path).decode("utf-8-sig"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
        raise Refused("bad_json", f"unreadable json: {e}", path) from None
    if not isinstance(meta, dict):
        raise Refused("bad_json", f"json is a {type(meta).__name__}, expected an object", path)
    try:
        check_meta(meta)
    except ValueError as e:
        raise Refused("bad_json", str(e), path) from None
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def check_meta(meta: dict[str, Any]) -> None:
    """Raises ValueError naming the first field of a sample json (schema in captions.py) that the
    pipeline reads and that has the wrong type."""
    problems = []
    tags = meta.get("tags")
    if tags is not None and not _str_list(tags) and not (
            isinstance(tags, dict) and all(isinstance(k, str) and _str_list(v) for k, v in tags.items())):
        problems.append(("tags", "must map category -> list of strings (or be one list of strings)", tags))
    for k in ("caption", "cached_caption", "source"):
        if meta.get(k) is not None and not isinstance(meta[k], str):
            problems.append((k, "must be a string", meta[k]))
    control = meta.get("control")
    if control is not None and not (isinstance(control, dict) and all(isinstance(v, str) for v in control.values())):
        problems.append(("control", "must map metric -> token string", control))
    for k in ("width", "height"):
        if k in meta and not (_is_int(meta[k]) and meta[k] > 0):
            problems.append((k, "must be a positive integer (pixels)", meta[k]))
    for k, lo in (("bucket", 1), ("original_size", 1), ("crop", 0)):
        v = meta.get(k)
        if k in meta and not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= lo for x in v)):
            problems.append((k, f"must be [height, width] of integers >= {lo}", v))
    if problems:
        k, what, v = problems[0]
        raise ValueError(f"json field {k!r} {what}, got {json.dumps(v, ensure_ascii=False)[:80]}")


def has_color_stats(meta: dict[str, Any], metrics: tuple[str, ...]) -> bool:
    """json["color"] holds a finite number for every metric (data/annotate_colors.py's resume test)."""
    c = meta.get("color")
    return isinstance(c, dict) and all(
        isinstance(c.get(m), (int, float)) and not isinstance(c.get(m), bool) and math.isfinite(c[m]) for m in metrics)


# ---- the report


@dataclass
class Refusals:
    """Refused files of one script run: printed as they come, summed by reason, written as JSON."""

    files: list[dict[str, str]] = field(default_factory=list)
    echo: bool = True  # print each refusal to stderr as it is added

    def add(self, path: str | Path, reason: str, message: str, sample: str | Path | None = None) -> None:
        entry = {"path": str(path), "reason": reason, "message": message}
        if sample is not None and str(sample) != str(path):
            entry["sample"] = str(sample)  # the image left out because of its sidecar
        self.files.append(entry)
        if self.echo:
            left_out = f" ({entry['sample']} left out)" if "sample" in entry else ""
            print(f"refused {reason}: {path}: {message}{left_out}", file=sys.stderr)

    def add_error(self, e: Refused, sample: str | Path) -> None:
        self.add(e.path or sample, e.reason, str(e), sample=sample)

    def counts(self) -> dict[str, int]:
        return dict(Counter(f["reason"] for f in self.files).most_common())

    def table(self) -> str:
        counts = self.counts()
        if not counts:
            return "no file refused"
        width = max(len(r) for r in counts) + 2
        rows = [f"  {r:<{width}}{n:>7}" for r, n in counts.items()]
        return "\n".join([f"refused {len(self.files)} files:", f"  {'reason':<{width}}{'files':>7}", *rows])

    def finish(self, report: Path, usable: int, strict: bool, **extra: Any) -> int:
        """Print the table, write the JSON report ({"refused": {reason: n}, "files": [{path, reason,
        message[, sample]}], **extra}) and return the exit status: 1 when nothing usable was written
        (`usable` == 0) or, with `strict`, when any file was refused; else 0."""
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"refused": self.counts(), "files": self.files, **extra}, indent=1,
                                     ensure_ascii=False))
        print(self.table() + (f"; report: {report}" if self.files else ""), file=sys.stderr)
        if usable == 0:
            print("error: nothing usable was written", file=sys.stderr)
            return 1
        if strict and self.files:
            print(f"error: --strict and {len(self.files)} files refused", file=sys.stderr)
            return 1
        return 0
