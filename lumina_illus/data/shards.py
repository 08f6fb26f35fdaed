"""Webdataset tar shards: resolving shard specs, reading samples out of a tar, writing shards.

A sample is the group of consecutive tar members sharing a key (webdataset convention: the key is
the path up to the first dot of the file name, the extension is the rest): `{key}.jpg|png|webp`,
`{key}.txt`, `{key}.json` (schema in captions.py), and in latent shards `{key}.latent.safetensors`.

    manifest = write_shards(samples, "shards/", samples_per_shard=1000)   # samples: dicts, see below
    entry = write_shard("latents/shard-000007.tar", samples)              # one shard, under a name you choose
    urls = expand_shards(["shards/shard-{000000..000009}.tar", "pipe:curl -s http://.../x.tar"])
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
from PIL import Image

from lumina_illus.config import DataConfig, to_dict
from lumina_illus.data.reasons import SHARD_ERRORS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.safetensors"
MANIFEST = "manifest.json"


def expand_shards(specs: list[str]) -> list[str]:
    """Shard specs -> ordered list of urls: brace patterns expanded (pipe commands too), local globs
    matched (sorted). A local spec that matches nothing is an error naming it."""
    out: list[str] = []
    for spec in specs:
        for s in braceexpand.braceexpand(spec):
            if s.startswith("pipe:"):
                out.append(s)  # "pipe:curl -s http://host/shard-{000..099}.tar": one command per shard
            elif any(c in s for c in "*?["):
                hits = sorted(glob.glob(s))
                if not hits:
                    raise FileNotFoundError(f"data.shards: pattern {s!r} matches no file")
                out.extend(hits)
            elif os.path.exists(s):
                out.append(s)
            else:
                raise FileNotFoundError(f"data.shards: shard {s!r} does not exist")
    if not out:
        raise FileNotFoundError("data.shards: no shards given")
    return out


@dataclass
class TarSample:
    index: int  # ordinal of this key group in its tar (the resume cursor counts these)
    key: str
    files: dict[str, bytes]  # extension -> bytes


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.latent.safetensors' -> ('dir/abc', 'latent.safetensors')."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


class ShardReadError(Exception):
    """A shard read that ended early; `reason` is one of reasons.SHARD_ERRORS."""

    def __init__(self, reason: str, msg: str):
        assert reason in SHARD_ERRORS, reason
        super().__init__(msg)
        self.reason = reason


class _Header(tarfile.TarInfo):
    """TarInfo that notes on the TarFile how its last header read went: tarfile ends iteration the same
    way for the end-of-archive marker (a zero block) and for a file that stops at or inside a header,
    or a corrupt header; only the first is a complete archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.lumina_end = "end-of-archive marker"
            raise
        except tarfile.EmptyHeaderError:
            tf.lumina_end = "the file ends where the next header should start"
            raise
        except tarfile.TruncatedHeaderError:
            tf.lumina_end = "the file ends inside a member header"
            raise
        except tarfile.InvalidHeaderError as e:
            tf.lumina_end = f"corrupt member header ({e})"
            raise


def _open(url: str) -> tuple[Any, subprocess.Popen | None, Any]:
    """(byte stream, process or None, stderr file or None) of a path or a "pipe:command"."""
    if url.startswith("pipe:"):
        err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on stderr
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=err, bufsize=1 << 20)
        return proc.stdout, proc, err
    try:
        return open(url, "rb"), None, None
    except FileNotFoundError as e:
        raise ShardReadError("missing_shard", f"cannot open shard: {e}") from None


def _pipe_status(proc: subprocess.Popen, err: Any, drained: bool) -> ShardReadError | None:
    """The pipe command's failure, or None. `drained`: its output was read to the end, so its exit
    status is its own verdict; otherwise the reader stopped early (and closed the stream): the
    command either failed by itself or dies of the broken pipe, which is not its failure."""
    try:
        rc = proc.wait(timeout=None if drained else 5)
    except subprocess.TimeoutExpired:  # still running although nobody reads: not its fault
        proc.kill()
        proc.wait()
        return None
    if rc == 0 or (not drained and rc in (-signal.SIGPIPE, 128 + signal.SIGPIPE)):
        return None
    err.seek(0)
    tail = err.read()[-500:].decode("utf-8", errors="replace").strip()
    return ShardReadError("pipe_failed", f"command exited with status {rc}" + (f": {tail}" if tail else ""))


def iter_tar(url: str) -> Iterator[TarSample | ShardReadError]:
    """Samples of one shard in tar order. A read that ends early (missing file, I/O error, failing
    pipe command, truncated or corrupt archive) ends the shard: the group being assembled is dropped
    (a sample cut between its files is never delivered without its caption) and a ShardReadError is
    yielded last, so the caller counts it and moves on."""
    index, key, files = 0, None, {}
    proc = err = None
    finished = False
    failure: ShardReadError | None = None
    try:
        stream, proc, err = _open(url)
        with stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header) as tar:
            tar.lumina_end = None
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if k != key and key is not None:
                    yield TarSample(index, key, files)
                    index, files = index + 1, {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
                if len(files[ext]) != member.size:
                    raise tarfile.ReadError(f"member {member.name} holds {len(files[ext])} of {member.size} bytes")
            if tar.lumina_end != "end-of-archive marker":
                raise tarfile.ReadError(f"no end-of-archive marker: {tar.lumina_end or 'the stream ended'}")
            if proc is not None:
                while stream.read(1 << 20):  # the record padding after the marker: the command's exit
                    pass  # status is then its own, not a broken pipe
            finished = True
    except ShardReadError as e:
        failure = e
    except (tarfile.TarError, EOFError) as e:
        failure = ShardReadError("truncated_tar", f"archive ends early: {e}")
    except OSError as e:
        failure = ShardReadError("read_error", f"{type(e).__name__}: {e}")
    finally:
        if proc is not None:
            pipe_failure = _pipe_status(proc, err, drained=finished)
            failure = pipe_failure or failure  # a failing command explains the short archive
            err.close()
    if failure is None and key is not None:
        yield TarSample(index, key, files)
    if failure is not None:
        yield failure


def _encode(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        value.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    if ext == "json":
        return json.dumps(value, ensure_ascii=False).encode()
    if isinstance(value, str):
        return value.encode()
    raise ValueError(f"cannot encode field {ext!r} of type {type(value).__name__}")


def sample_size(files: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of a sample from its json (bucket of a latent sample, else width/height)
    or image header; None when neither is readable. Raises ValueError naming a json field of the
    wrong type (sources.check_meta); json that does not parse is left for the loader to count."""
    meta = files.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict):
        from lumina_illus.data.sources import check_meta

        check_meta(meta)  # ValueError naming the field
        if "bucket" in meta:
            return meta["bucket"][0], meta["bucket"][1]
        if "width" in meta and "height" in meta:
            return meta["height"], meta["width"]
    for ext in IMAGE_EXTS:
        v = files.get(ext)
        if isinstance(v, Image.Image):
            return v.height, v.width
        if v:
            from lumina_illus.data.decode import DecodeError, open_image

            try:
                _, h, w = open_image(v)
                return h, w
            except DecodeError:
                return None
    return None


def _write_one(path: Path, samples: list[dict[str, Any]]) -> int:
    tmp = path.with_suffix(".tar.tmp")
    now = time.time()
    with tarfile.open(tmp, "w") as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = _encode(ext, value)
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)  # a crash never leaves a half-written shard under the final name
    return path.stat().st_size


def verify_shard(path: Path, keys: list[str], exts: list[set[str]]) -> None:
    """Re-read a written shard; raises ValueError naming the shard if it differs from what was meant."""
    got = list(iter_tar(str(path)))
    if got and isinstance(got[-1], Exception):
        raise ValueError(f"{path}: unreadable after writing: {got[-1]}")
    if [s.key for s in got] != keys:
        raise ValueError(f"{path}: holds {len(got)} samples, expected {len(keys)} (keys differ)")
    for s, e in zip(got, exts):
        if set(s.files) != e:
            raise ValueError(f"{path}: sample {s.key!r} has fields {sorted(s.files)}, expected {sorted(e)}")


def _prepare(s: dict[str, Any], seen: set[str], bucket_cfg: DataConfig, hist: Counter[str], where: str) -> dict[str, Any]:
    """A sample checked (key without dots, unique in its shard `where`) and encoded now, so that a bad
    field is named with its sample (not found when the shard is written); counts its bucket in `hist`."""
    from lumina_illus.data.buckets import assign_bucket

    key = s.get("__key__")
    if not isinstance(key, str) or not key or "." in os.path.basename(key):
        raise ValueError(f"sample key {key!r} must be a non-empty string without dots")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r} in {where}")
    seen.add(key)
    try:
        s = {"__key__": key, **{ext: _encode(ext, v) for ext, v in s.items() if ext != "__key__"}}
        size = sample_size(s)
    except (TypeError, ValueError) as e:  # TypeError: a json value json.dumps cannot write
        raise ValueError(f"sample {key!r}: {e}") from None
    if size:
        bh, bw = assign_bucket(bucket_cfg, *size)
        hist[f"{bh}x{bw}"] += 1
    else:
        hist["unknown"] += 1
    return s


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]], *, bucket_cfg: DataConfig | None = None,
                verify: bool = True) -> dict[str, Any]:
    """One shard at `path` (written under a temporary name, then renamed; with `verify`, read back and
    checked); returns {"name", "samples", "bytes", "buckets": {"HxW": n}}. Samples as in write_shards."""
    path, hist, seen = Path(path), Counter(), set()
    pending = [_prepare(s, seen, bucket_cfg or DataConfig(), hist, path.name) for s in samples]
    nbytes = _write_one(path, pending)
    if verify:
        verify_shard(path, [s["__key__"] for s in pending], [set(s) - {"__key__"} for s in pending])
    return {"name": path.name, "samples": len(pending), "bytes": nbytes, "buckets": dict(sorted(hist.items()))}


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int,
    *,
    prefix: str = "shard",
    bucket_cfg: DataConfig | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Write samples into `out_dir/{prefix}-000000.tar`, ... of `samples_per_shard` samples each and
    `out_dir/manifest.json`; returns the manifest.

    A sample is a dict {"__key__": str (no dots), "jpg"|"png"|"webp": bytes or PIL image,
    "txt": str, "json": dict, ...}; other fields are written as given (bytes or str).
    The manifest holds per-shard sample counts and bytes, totals, and the histogram of buckets
    (for `bucket_cfg`, default DataConfig()). With `verify`, every shard is read back and checked.
    A field that cannot be encoded or a json field of the wrong type (sources.check_meta) raises
    ValueError naming the sample's key and the field."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    bucket_cfg = bucket_cfg or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    hist: Counter[str] = Counter()
    pending: list[dict[str, Any]] = []
    seen: set[str] = set()

    def flush() -> None:
        path = out / f"{prefix}-{len(shards):06d}.tar"
        nbytes = _write_one(path, pending)
        if verify:
            verify_shard(path, [s["__key__"] for s in pending], [set(s) - {"__key__"} for s in pending])
        shards.append({"name": path.name, "samples": len(pending), "bytes": nbytes})
        pending.clear()
        seen.clear()

    for s in samples:
        pending.append(_prepare(s, seen, bucket_cfg, hist, f"shard {len(shards)}"))
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    manifest = {
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "buckets": dict(sorted(hist.items())),  # "HxW" -> samples
        "bucket_config": {k: v for k, v in to_dict(bucket_cfg).items() if k in (
            "min_area", "max_area", "area_step", "bucket_step", "max_aspect")},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """url -> sample count from manifest.json files next to local shards (missing ones omitted)."""
    counts: dict[str, int] = {}
    for d in {os.path.dirname(u) for u in urls if not u.startswith("pipe:")}:
        m = Path(d or ".") / MANIFEST
        if m.is_file():
            try:
                for s in json.loads(m.read_text())["shards"]:
                    counts[os.path.join(d, s["name"])] = int(s["samples"])
            except (ValueError, KeyError, TypeError):
                continue
    return {u: counts[u] for u in urls if u in counts}


def text_feature_cache(data: DataConfig) -> Path | None:
    """The manifest.json of a cache holding text features (data/cache_latents.py --text-embeds) beside the
    shards of `data`, None when `data` reads no such cache (image shards, latents only, or missing shards:
    the loader reports those)."""
    if not data.cached_latents:
        return None
    try:
        urls = expand_shards(data.shards)
    except FileNotFoundError:
        return None
    for d in sorted({os.path.dirname(u) for u in urls if not u.startswith("pipe:")}):
        m = Path(d or ".") / MANIFEST
        try:
            if m.is_file() and json.loads(m.read_text()).get("settings", {}).get("text_embeds"):
                return m
        except (ValueError, AttributeError):  # not a cache manifest
            continue
    return None
