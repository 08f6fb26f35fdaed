"""What runs inside each DataLoader worker: read my shards, shuffle, decode, bucket, batch.

Each worker is one consumer (consumer id = rank * num_workers + worker role) of the work items
dealt round-robin from the layout's origin cursor (cursor.py). It yields (Batch, book) pairs; `book`
tells the main process which samples the batch holds and which samples were skipped or shards
finished since the last batch, so the cursor and the skip counts are updated only for what the
trainer really received. The book also carries a snapshot of the consumer right after that batch
(position in its work items, shuffle RNG state, and by sample identity what the shuffle buffer and
the packer or bucket queues hold): a resume with the same layout restores it, re-reading only those
samples, and continues with exactly the batches the uninterrupted stream would have produced.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch.utils.data import IterableDataset, get_worker_info

from lumina_illus.config import DataConfig, from_dict
from lumina_illus.data.batch import Batch
from lumina_illus.data.buckets import Bucket, assign_bucket, image_tokens, resize_and_crop
from lumina_illus.data.captions import CaptionConfig, CaptionError, build_caption
from lumina_illus.data.cursor import Cursor
from lumina_illus.data.decode import DecodeError, load_rgb, open_image, to_tensor
from lumina_illus.data.packing import BucketBatcher, TokenPacker
from lumina_illus.data.reasons import RETRIED
from lumina_illus.data.shards import IMAGE_EXTS, LATENT_EXT, ShardReadError, TarSample, iter_tar

log = logging.getLogger("lumina_illus.data")

# Only data errors are skipped (reasons.SAMPLE_REASONS); an exception of any other kind while
# building a sample is a bug and stops the run with the shard and the key (SampleBug).


class SkipSample(Exception):
    """A data error in one sample: skipped and counted under `reason` (SAMPLE_REASONS)."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


class SampleBug(RuntimeError):
    """Building a sample raised something that is not a data error: a bug, which stops the run."""


@dataclass
class Sample:
    epoch: int
    shard: int
    ordinal: int
    key: str  # "<shard file>/<key>" (Batch.keys)
    tar_key: str  # the key inside the tar (skip reports)
    caption: str
    pixels: torch.Tensor | None  # (3, H, W) in [-1, 1]
    latent: torch.Tensor | None  # (C, h, w) cached VAE latent
    text_embeds: torch.Tensor | None
    text_pooled: torch.Tensor | None  # (P,) SDXL caches: bigG's pooled embedding of the cached caption
    original_size: tuple[int, int]  # (h, w)
    crop: tuple[int, int]  # (top, left)
    bucket: Bucket  # (H, W) pixels
    tokens: int


def read_caption(
    ts: TarSample, cap: CaptionConfig, rng: random.Random, latent_mode: bool
) -> tuple[dict[str, Any], str, int | None]:
    """(json, caption, cached variant) of one tar sample, every check the loader makes before touching
    the image or latent. Raises SkipSample(reason). Also used by data/character_set.py, so its counts
    skip exactly the samples the loader skips for their json or caption.

    The variant is None unless the sample caches K caption variants (data/cache_latents.py
    --caption-variants K: json "cached_captions", features "text_embeds_{k}" and, SDXL, "text_pooled_{k}"):
    then variant k is drawn from `rng`, the sample's own random stream, so the choice is a function of
    (seed, epoch, shard, sample) like the tag shuffle it replaces, and survives a resume."""
    meta: dict[str, Any] = {}
    if "json" in ts.files:
        try:
            meta = json.loads(ts.files["json"].decode("utf-8-sig"))  # a byte-order mark is not content
        except ValueError as e:  # UnicodeDecodeError included
            raise SkipSample("bad_json", f"json unreadable: {e}") from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", f"json is a {type(meta).__name__}, expected an object")
    text = None
    if "txt" in ts.files:
        try:
            text = ts.files["txt"].decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SkipSample("bad_caption_encoding", f".txt is not valid UTF-8: {e}") from None
    variant = None
    if latent_mode and "cached_captions" in meta:
        variants = meta["cached_captions"]
        if not isinstance(variants, list) or not variants:
            raise SkipSample("bad_json", f"json 'cached_captions' must be a non-empty list, got {variants!r:.80}")
        variant = rng.randrange(len(variants))
        caption = str(variants[variant])
    elif latent_mode and "cached_caption" in meta:
        # text features were cached for this exact caption (data/cache_latents.py --text-embeds, one variant)
        caption = str(meta["cached_caption"])
    else:
        try:
            caption = build_caption(cap, text, meta, rng)
        except CaptionError as e:
            raise SkipSample("missing_caption", str(e)) from None
    return meta, caption, variant


def decode_sample(
    ts: TarSample, cfg: DataConfig, cap: CaptionConfig, rng: random.Random, latent_mode: bool
) -> dict[str, Any]:
    """One tar sample -> caption, pixels or latent, sizes, crop. Raises SkipSample(reason)."""
    meta, caption, variant = read_caption(ts, cap, rng, latent_mode)
    if latent_mode:
        if LATENT_EXT not in ts.files:
            raise SkipSample("missing_image", f"no {LATENT_EXT} in a latent shard")
        try:
            tensors = load_safetensors(ts.files[LATENT_EXT])
            latent = tensors["latent"].float()  # (C, h, w); stored bf16 by default
            suffix = "" if variant is None else f"_{variant}"
            name = "text_embeds" + suffix
            embeds = tensors[name].float() if name in tensors else None  # (L, D); stored bf16/fp16/fp32
            pooled = tensors["text_pooled" + suffix].float() if "text_pooled" + suffix in tensors else None  # (P,)
            if variant is not None and embeds is None:
                raise KeyError(f"{name} (json lists {len(meta['cached_captions'])} cached captions)")
            bucket = (int(meta["bucket"][0]), int(meta["bucket"][1]))
            original = (int(meta["original_size"][0]), int(meta["original_size"][1]))
            crop = (int(meta["crop"][0]), int(meta["crop"][1]))
        except (KeyError, IndexError, TypeError, ValueError, SafetensorError) as e:  # missing/bad fields
            raise SkipSample("bad_json", f"latent sample incomplete: {type(e).__name__}: {e}") from None
        return dict(caption=caption, pixels=None, latent=latent, text_embeds=embeds, text_pooled=pooled,
                    original_size=original, crop=crop, bucket=bucket)

    ext = next((e for e in IMAGE_EXTS if e in ts.files), None)
    if ext is None:
        raise SkipSample("missing_image", f"no image among fields {sorted(ts.files)}")
    try:
        img, h, w = open_image(ts.files[ext])
    except DecodeError as e:
        raise SkipSample(e.reason, str(e)) from None
    if min(h, w) < cfg.min_side:
        raise SkipSample("too_small", f"{w}x{h} below min_side {cfg.min_side}")
    if max(h / w, w / h) > cfg.skip_aspect:
        raise SkipSample("bad_aspect", f"{w}x{h} more elongated than skip_aspect {cfg.skip_aspect}")
    bucket = assign_bucket(cfg, h, w)
    scale = max(bucket[0] / h, bucket[1] / w)
    try:
        rgb = load_rgb(img, min_height=int(h * scale) + 1, min_width=int(w * scale) + 1)
    except DecodeError as e:
        raise SkipSample(e.reason, str(e)) from None
    rgb, crop = resize_and_crop(rgb, bucket, rng if cfg.random_crop else None)
    return dict(caption=caption, pixels=to_tensor(rgb), latent=None, text_embeds=None, text_pooled=None,
                original_size=(h, w), crop=crop, bucket=bucket)


def collate(samples: list[Sample]) -> Batch:
    latent = samples[0].latent is not None
    embeds = [s.text_embeds for s in samples]
    pooled = [s.text_pooled for s in samples]
    return Batch(
        keys=[s.key for s in samples],
        captions=[s.caption for s in samples],
        images=None if latent else [s.pixels for s in samples],
        latents=[s.latent for s in samples] if latent else None,
        original_sizes=[s.original_size for s in samples],
        crops=[s.crop for s in samples],
        target_sizes=[s.bucket for s in samples],
        text_embeds=embeds if all(e is not None for e in embeds) else None,
        text_pooled=pooled if all(p is not None for p in pooled) else None,
    )


class ShardStream(IterableDataset):
    """Infinite stream of (Batch, book) for one rank; split further by DataLoader worker."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        layout: dict[str, Any],
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        latent_mode: bool,
        expected: dict[str, int] | None = None,
    ):
        # layout: {"origin": cursor state the work items are dealt from, "role_offset": worker whose
        # batch comes first, "consumers": {str(consumer id): snapshot}} (see Loader)
        self.cfg, self.urls, self.layout = cfg, urls, layout
        self.caption_cfg = from_dict(CaptionConfig, cfg.caption, where="data.caption", prefix="data.caption.")
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.latent_mode = seed, latent_mode
        self.expected = expected or {}  # url -> samples its manifest lists (truncation is counted against it)

    def _read(self, url: str, start: int) -> Iterator[TarSample | ShardReadError]:
        """iter_tar from sample ordinal `start` on, retrying failures that a new read can cure
        (shards.RETRIED) data.read_retries times with exponential backoff; a failure that stays is
        yielded last."""
        for attempt in range(self.cfg.read_retries + 1):
            failure = None
            for ts in iter_tar(url):
                if isinstance(ts, ShardReadError):
                    failure = ts
                    break
                if ts.index >= start:
                    start = ts.index + 1
                    yield ts
            if failure is None:
                return
            if failure.reason not in RETRIED or attempt == self.cfg.read_retries:
                yield failure
                return
            delay = self.cfg.retry_backoff_s * 2**attempt
            log.warning("data: %s reading %s (%s); retry %d of %d in %.1f s from sample %d", failure.reason, url,
                        failure, attempt + 1, self.cfg.read_retries, delay, start)
            time.sleep(delay)

    def _items(self, consumer: int, n_consumers: int, pos: dict[str, int]) -> Iterator[tuple[str, Any]]:
        """Raw events of this consumer in order: ("sample", (epoch, shard, TarSample)),
        ("skip", (epoch, shard, ordinal, reason, where, key, msg, lost)), ("end", (epoch, shard, n)),
        ("epoch", epoch) when a work item of that epoch starts.

        The work items are those of the layout's origin cursor dealt round-robin, so the sequence is
        a pure function of (origin, consumer, n_consumers). `pos` is kept up to date (work item index,
        samples read in it, readable ones, dry count); a resume passes the saved `pos` and the stream
        continues after the last sample read, inside that work item."""
        cursor = Cursor.from_state(self.layout["origin"])
        start, after = pos["item"], pos["n"]  # resume inside item `start` after its first `after` samples
        dry = pos["dry"]  # work items in a row without one readable sample
        why: dict[str, int] = {}  # shard failures during the dry streak, by reason
        for i, item in enumerate(cursor.work()):
            if i % n_consumers != consumer or i < start:
                continue
            url = self.urls[item.shard]
            resumed = i == start
            n, got = (after, pos["got"]) if resumed else (0, 0)
            pos.update(item=i, n=n, got=got)
            if not resumed:
                yield "epoch", item.epoch
            # from sample n on: what was read before a checkpoint is restored from the snapshot
            for ts in self._read(url, n):
                if isinstance(ts, ShardReadError):
                    why[ts.reason] = why.get(ts.reason, 0) + 1
                    yield "skip", self._shard_failure(item.epoch, item.shard, url, n, ts.reason, str(ts))
                    break
                n += 1
                keep = ts.index not in item.skip
                got += keep
                pos.update(n=n, got=got)
                if keep:
                    yield "sample", (item.epoch, item.shard, ts)
            else:
                if n < self.expected.get(url, 0):
                    yield "skip", self._shard_failure(item.epoch, item.shard, url, n, "truncated_tar",
                                                      f"complete archive, but its manifest lists {self.expected[url]}")
            yield "end", (item.epoch, item.shard, n)
            dry = 0 if got else dry + 1
            why = why if dry else {}
            pos["dry"] = dry
            if dry > 2 * len(self.urls) + n_consumers:
                failures = ", ".join(f"{r} {k}" for r, k in sorted(why.items())) or "none (every sample was skipped)"
                raise RuntimeError(f"data: no readable sample in {dry} shard reads in a row (shards {self.urls[:3]}...); "
                                   f"shard read failures among them: {failures}")

    def _shard_failure(self, epoch: int, shard: int, url: str, n: int, reason: str, msg: str) -> tuple:
        """The skip event of a shard read that ended after n samples: samples lost from the manifest."""
        total = self.expected.get(url)
        lost = max(0, total - n) if total is not None else 0
        how_many = f"{lost} of its {total} samples lost" if total is not None else "samples lost unknown (no manifest)"
        return (epoch, shard, -1, reason, url, "", f"ended after {n} samples, {how_many}: {msg}", lost)

    def _restore(self, snap: dict[str, Any], make: Any) -> tuple[list, list, list]:
        """Re-read the samples a snapshot holds (shuffle buffer, packer or bucket queues) from their
        shards: the buffer as raw TarSamples, the rest decoded again (decoding is deterministic per
        sample). Returns (buffer, pending, queues) in the snapshot's order."""
        ids = [tuple(x) for x in snap["buffer"]] + [tuple(x) for x in snap.get("pending", [])]
        for _, q in snap.get("queues", []):
            ids += [tuple(x) for x in q]
        need: dict[int, set[int]] = {}
        for _, shard, ordinal in ids:
            need.setdefault(shard, set()).add(ordinal)
        tars: dict[tuple[int, int], TarSample] = {}
        for shard, ordinals in need.items():
            last = max(ordinals)
            for ts in self._read(self.urls[shard], 0):
                if isinstance(ts, ShardReadError):
                    break
                if ts.index in ordinals:
                    tars[(shard, ts.index)] = ts
                if ts.index >= last:
                    break
            lost = sorted(o for o in ordinals if (shard, o) not in tars)
            if lost:
                raise RuntimeError(f"data: resuming the shuffle state needs samples {lost[:5]} of shard "
                                   f"{self.urls[shard]}, which it no longer holds (shard changed since the checkpoint?)")

        def sample(e: int, s: int, o: int) -> Sample:
            try:
                return make(e, s, tars[(s, o)])
            except Exception as err:
                raise RuntimeError(f"data: sample {o} of shard {self.urls[s]} decoded before the checkpoint "
                                   f"but fails now ({err}); shard changed since the checkpoint?") from err

        buffer = [(e, s, tars[(s, o)]) for e, s, o in (tuple(x) for x in snap["buffer"])]
        pending = [sample(*x) for x in snap.get("pending", [])]
        queues = [(tuple(b), [sample(*x) for x in q]) for b, q in snap.get("queues", [])]
        return buffer, pending, queues

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        if info is not None:
            torch.set_num_threads(1)  # workers decode with PIL; torch threads would oversubscribe cores
        # a resumed DataLoader starts with its worker 0, but the batch the trainer needs next comes from
        # the worker whose turn it was (DataLoader takes workers round-robin): worker ids are rotated
        role = (wid + self.layout["role_offset"]) % nw
        consumer, n_consumers = self.rank * nw + role, self.world_size * nw
        cfg = self.cfg
        # the shuffle is a pure function of (seed, consumer, layout origin): a resume with the same
        # layout continues the very same shuffle from its snapshot; a new layout draws a new one
        rng = random.Random(f"{self.seed}/{consumer}/{n_consumers}/{self.layout['origin']['samples_seen']}")
        buffer: list[tuple[int, int, TarSample]] = []
        events: list[tuple[str, Any]] = []  # skips and shard ends since the last batch
        packer = TokenPacker(cfg.token_budget, self.micro_batch, cfg.pack_lookahead) if cfg.batching == "tokens" else None
        bucketer = BucketBatcher(self.micro_batch) if packer is None else None
        epoch_now = 0
        pos = {"item": -1, "n": 0, "got": 0, "dry": 0}

        def make(epoch: int, shard: int, ts: TarSample) -> Sample:
            # augmentation randomness (tag shuffle, dropouts, crop) is a pure function of the sample's
            # identity, so a resumed run (any world size) builds exactly the captions the first run would
            sample_rng = random.Random(f"{self.seed}/{epoch}/{shard}/{ts.index}")
            d = decode_sample(ts, cfg, self.caption_cfg, sample_rng, self.latent_mode)
            name = self.urls[shard].rsplit("/", 1)[-1]
            return Sample(epoch, shard, ts.index, f"{name}/{ts.key}", ts.key, tokens=image_tokens(cfg, d["bucket"]),
                          **d)

        snap = self.layout["consumers"].get(str(consumer))
        if snap is not None:
            buffer, pending, queues = self._restore(snap, make)
            if packer is not None:
                packer.pending = [(s, s.tokens) for s in pending]
            else:
                bucketer.queues = dict(queues)
            v, internal, gauss = snap["rng"]
            rng.setstate((v, tuple(internal), gauss))
            epoch_now = snap["epoch"]
            pos = dict(snap["pos"])

        def ids(samples: list) -> list[list[int]]:
            return [[s.epoch, s.shard, s.ordinal] for s in samples]

        def snapshot() -> dict[str, Any]:
            """Everything this consumer's future depends on, by sample identity (JSON-able)."""
            v, internal, gauss = rng.getstate()
            d = {"pos": dict(pos), "epoch": epoch_now, "rng": [v, list(internal), gauss],
                 "buffer": [[e, s, ts.index] for e, s, ts in buffer]}
            if packer is not None:
                d["pending"] = ids([x for x, _ in packer.pending])
            else:
                d["queues"] = [[list(b), ids(q)] for b, q in bucketer.queues.items()]
            return d

        def emit(samples: list[Sample]) -> tuple[Batch, dict[str, Any]]:
            book = {
                "samples": [(s.epoch, s.shard, s.ordinal) for s in samples],
                "buckets": [s.bucket for s in samples],
                "events": list(events),
                "tokens": sum(s.tokens for s in samples),
                "budget": cfg.token_budget if packer is not None else sum(s.tokens for s in samples),
                "consumer": consumer,
                "role": role,
                "snapshot": snapshot(),  # this consumer's state right after this batch
            }
            events.clear()
            return collate(samples), book

        def process(epoch: int, shard: int, ts: TarSample) -> list[Sample] | None:
            where = self.urls[shard]
            try:
                s = make(epoch, shard, ts)
            except SkipSample as e:  # a data error: skipped, counted, reported with shard and key
                log.warning("skipped %s: shard=%s key=%s: %s", e.reason, where, ts.key, e)
                events.append(("skip", (epoch, shard, ts.index, e.reason, where, ts.key, str(e), 1)))
                return None
            except Exception as e:  # not a data error: our bug; stop with where it happened
                raise SampleBug(f"data: {type(e).__name__} while building sample key={ts.key} of shard {where} "
                                f"(a bug, not bad data; the traceback follows): {e}") from e
            if packer is not None:
                return packer.add(s, s.tokens)
            return bucketer.add(s, s.bucket)

        for kind, payload in self._items(consumer, n_consumers, pos):
            if kind == "epoch":
                epoch_now = payload
                if bucketer is not None:
                    # drop_last for buckets that did not fill within an epoch; counted, never silent
                    for b, q in list(bucketer.queues.items()):
                        old = [s for s in q if s.epoch < epoch_now - 1]
                        for s in old:
                            events.append(("skip", (s.epoch, s.shard, s.ordinal, "bucket_leftover",
                                                    self.urls[s.shard], s.tar_key, f"bucket {b} never filled", 1)))
                        bucketer.queues[b] = [s for s in q if s.epoch >= epoch_now - 1]
                continue
            if kind != "sample":
                if kind == "skip":
                    log.warning("data: %s: shard=%s: %s", payload[3], payload[4], payload[6])
                events.append((kind, payload))
                continue
            buffer.append(payload)
            if len(buffer) < cfg.shuffle_buffer:
                continue
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out = process(*buffer.pop())
            if out:
                yield emit(out)
