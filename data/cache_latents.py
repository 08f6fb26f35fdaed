"""python data/cache_latents.py CONFIG.yaml OUT_DIR [--device cuda] [--text-embeds [--caption-variants K]] [--wait-timeout 1800] [--strict]

Pre-computes VAE latents of the image shards named in CONFIG's `data.shards`, with CONFIG's bucket
settings and the frozen encoders CONFIG's family trains with (`Family.cache_encoders`: Lumina-2 the VAE
of `model.vae.path`; SDXL that or the VAE inside `model.pretrained`, scaled by model.vae.scaling_factor
0.13025, lumina_illus.models.vae.LatentCodec), and writes them as
shards the training pipeline reads the same way (set `data.cached_latents: true` and point
`data.shards` at OUT_DIR/shard-*.tar): each sample keeps its `.txt` / `.json` (captions are still
built, shuffled and dropped at training time) and gains `{key}.latent.safetensors` {"latent": (C, h, w)}
plus json "bucket", "crop", "original_size" (what SDXL's micro-conditioning needs).

--text-embeds also stores the frozen text encoder's features of one caption per sample, built once here:
tag shuffling and caption dropout are then frozen per sample (the caption used is stored as json
"cached_caption"). Lumina-2: "text_embeds" (L, D), Gemma-2's features of the caption's real tokens.
SDXL (text encoders frozen in model.frozen_dtype): "text_embeds" (c*77, 768+1280), the concatenated
penultimate CLIP-L and bigG states of the caption's own c chunks (c <= model.max_text_chunks; a batch's
empty padding chunks are rebuilt at training time), and "text_pooled" (1280,), bigG's pooled output
before its text_projection: models/sdxl.py cached_conditioning rebuilds from them the exact UNet inputs
of the live CLIPs. Training a text encoder on such a cache: SDXL (optim.text_encoder_lr) refuses it at
start; Lumina-2 (model.text_encoder.trainable) encodes the cached captions and leaves the features unused.

--caption-variants K (with --text-embeds, K > 1) keeps the augmentation instead: K captions per sample,
each built by data.caption's builder (tag order, tag/control/caption dropout, natural language vs
tags) from its own random stream: variant 0 from the sample's stream (the one caption K=1 stores),
variant k >= 1 from one seeded (run.seed, i, sample index, k). Stored as json "cached_captions"
[K captions] and features "text_embeds_0" .. "text_embeds_{K-1}" (SDXL: and "text_pooled_0" ..), each
(L_k, D) in --dtype holding only the caption's real tokens (system prompt included, no padding; SDXL: its
own chunks). The loader draws k from the sample's
random stream of (seed, epoch, shard, sample) (lumina_illus/data/stream.py read_caption), so each epoch
may see another variant and a resume picks the same ones.

Size of the text features per sample: K x L x D x 2 bytes (bf16/fp16) plus ~100 bytes of header per
tensor. The real run (Gemma-2-2B, D = 2304, bf16) stores 4,608 bytes per token. L counts Lumina's
system prompt and " <Prompt Start> " (~33 Gemma tokens, estimated: no Gemma tokenizer is on this
machine) plus the caption, capped by model.text_encoder.max_tokens (256 in lu2b_768): a ~95-token tag
caption gives L ~ 128, 0.59 MB per variant: K = 1 -> 0.59 MB per sample, 13 TB for 22M samples;
K = 4 -> 2.36 MB, 52 TB; captions at the 256 cap double that (1.18 MB per variant, 104 TB at K = 4).
A latent (16 x 96 x 96 bf16 at 768^2) is 0.3 MB, 6.5 TB for 22M. SDXL: a chunk is 77 x 2048 x 2 = 315,392
bytes, the pooled vector 2,560: a one-chunk caption 0.32 MB per variant, 7 TB for 22M at K = 1.
Toy numbers and the tables: BENCHMARKS.md ("Cached text features", "Cached CLIP features for SDXL").

Input shard i (in the order data.shards expands to) becomes OUT_DIR/shard-{i:06d}.tar, its samples
keyed "{i:06d}_{key}", in their input order; crops and captions draw from a random stream seeded by
(run.seed, i, sample index). So the output does not depend on how the work was split:

    python data/cache_latents.py CONFIG OUT                                  # one process
    torchrun --nproc-per-node 8 data/cache_latents.py CONFIG OUT --device cuda
    deepspeed --num_gpus 8 data/cache_latents.py CONFIG OUT --device cuda     # or --hostfile ...
    srun --ntasks-per-node 8 python data/cache_latents.py CONFIG OUT --device cuda

Each process (lumina_illus/dist_env.py: RANK/WORLD_SIZE, OMPI_COMM_WORLD_*, SLURM_PROCID/SLURM_NTASKS)
takes the input shards i with i % world_size == rank. A shard is written under a temporary name and
renamed, then its done marker OUT_DIR/done/shard-{i:06d}.json ({input, name, samples, bytes, buckets,
refused, settings}) is written the same way: a killed run leaves no half shard under a final name, and
a re-run (any world size) skips every shard with a marker. Markers written with other settings (VAE,
dtype, buckets, seed, captions, --text-embeds, text encoder) or another input at index i stop the run, naming both.
Rank 0 waits for every marker (a file barrier: no process group, no network; --wait-timeout seconds
without a new marker stops it, naming the missing shards and their ranks), then writes
OUT_DIR/manifest.json and the refused-files report of all ranks. Progress: one bar per rank
(samples, with ETA) and, on rank 0, one for all ranks (shards).

Identical to a one-process run means: the same shard names, the same samples in each, and every tar
member (latent, json, txt) byte for byte, with the same --dtype, device and torch intra-op threads
(CPU convolutions reduce in a thread-dependent order: 1 vs 2 threads differ by ~2e-7; torchrun sets
OMP_NUM_THREADS=1, so pass --threads to fix it). Tar headers carry the write time.

No bad sample or shard stops the run: samples the training pipeline would skip (same reasons) and
shards that cannot be read to the end are refused with the shard and key, printed as a table by
reason and written to OUT_DIR/refused.json ({"refused": {reason: n}, "files": [{path: shard,
sample: key, reason, message}]}). Exit status 1 when no latent was written, or with --strict when
anything was refused; 2 when rank 0 timed out waiting for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import ConfigError, RunConfig, from_dict, load_config, to_dict  # noqa: E402
from lumina_illus.data.captions import CaptionConfig  # noqa: E402
from lumina_illus.data.shards import (  # noqa: E402
    LATENT_EXT,
    MANIFEST,
    expand_shards,
    iter_tar,
    manifest_counts,
    write_shard,
)
from lumina_illus.data.sources import REFUSED, Refusals, check_meta  # noqa: E402
from lumina_illus.data.stream import SkipSample, decode_sample, read_caption  # noqa: E402
from lumina_illus.dist_env import LaunchEnv, launch_env, wait_for  # noqa: E402
from lumina_illus.families import CacheEncoders, TextFeatures, get_family  # noqa: E402
from lumina_illus.models.vae import LatentCodec, torch_dtype  # noqa: E402

DONE_DIR = "done"
# data fields that change what a latent sample holds (the rest only shape training batches)
OUTPUT_FIELDS = ("min_area", "max_area", "area_step", "bucket_step", "max_aspect", "skip_aspect", "min_side",
                 "random_crop", "caption")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def marker_path(out_dir: Path, i: int) -> Path:
    return out_dir / DONE_DIR / f"shard-{i:06d}.json"


def settings_of(cfg: RunConfig, args: argparse.Namespace, enc: CacheEncoders) -> dict[str, Any]:
    """Everything that decides the bytes of an output shard besides its input (markers must agree)."""
    data = to_dict(cfg.data)
    return {"data": {k: data[k] for k in OUTPUT_FIELDS}, "seed": cfg.run.seed, "vae": enc.settings["vae"],
            "text_encoder": enc.settings["text_encoder"],
            "dtype": args.dtype, "text_embeds": args.text_embeds,
            # absent for one variant, so caches made before --caption-variants existed stay resumable
            **({"caption_variants": args.caption_variants} if args.caption_variants > 1 else {})}


def read_marker(out_dir: Path, i: int, url: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Shard i's done marker, None when it is not done (no marker, or its shard file is gone).
    Raises ValueError when the marker belongs to another input or other settings."""
    path = marker_path(out_dir, i)
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    if m["input"] != url:
        raise ValueError(f"{path}: shard {i} was made from {m['input']}, this run's input {i} is {url} "
                         f"(data.shards changed: use a new OUT_DIR)")
    if m["settings"] != settings:
        diff = sorted(k for k in settings if m["settings"].get(k) != settings[k])
        raise ValueError(f"{path}: written with other settings ({', '.join(diff)}): "
                         + "; ".join(f"{k}: marker {m['settings'].get(k)} vs now {settings[k]}" for k in diff)
                         + " (use a new OUT_DIR, or delete OUT_DIR/done to redo everything)")
    if m["name"] is not None and not (out_dir / m["name"]).is_file():
        return None  # the shard was deleted: make it again
    return m


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def cached_samples(cfg: RunConfig, i: int, url: str, codec: LatentCodec, text_features: TextFeatures | None,
                   dtype: torch.dtype, refusals: Refusals, bar: tqdm, variants: int = 1) -> Iterator[dict[str, Any]]:
    """The latent samples of input shard i, in input order; bad ones go to `refusals`."""
    cap_cfg = from_dict(CaptionConfig, cfg.data.caption, where=f"{cfg.source}: data.caption")
    for ts in iter_tar(url):
        if isinstance(ts, Exception):  # the shard ends early: what it still held is lost
            refusals.add(url, getattr(ts, "reason", "truncated_tar"), str(ts))
            break
        bar.update(1)
        rng = random.Random(f"{cfg.run.seed}/{i}/{ts.index}")  # the same whichever rank encodes it
        try:
            d = decode_sample(ts, cfg.data, cap_cfg, rng, latent_mode=False)
        except SkipSample as e:
            refusals.add(url, e.reason, str(e), sample=ts.key)
            continue
        meta = json.loads(ts.files["json"].decode("utf-8-sig")) if "json" in ts.files else {}  # parsed above
        try:
            check_meta(meta)  # fields the loader does not read here, but the latent shard carries on
        except ValueError as e:
            refusals.add(url, "bad_json", str(e), sample=ts.key)
            continue
        latent = codec.encode([d["pixels"]])[0].to(dtype).cpu().contiguous()  # (C, h, w)
        tensors = {"latent": latent}
        meta.update(bucket=list(d["bucket"]), crop=list(d["crop"]), original_size=list(d["original_size"]))
        out: dict[str, Any] = {"__key__": f"{i:06d}_{ts.key.replace('/', '_')}"}
        if text_features is not None:
            # variant 0 is the caption decode_sample built; variant k draws from its own seeded stream
            captions = [d["caption"]] + [
                read_caption(ts, cap_cfg, random.Random(f"{cfg.run.seed}/{i}/{ts.index}/caption{k}"), False)[1]
                for k in range(1, variants)]
            # K x {"text_embeds": (L_k, D), family extras}: only the real tokens (Lumina) or own chunks (SDXL)
            for k, feats in enumerate(text_features(captions)):
                suffix = "" if variants == 1 else f"_{k}"
                tensors.update({name + suffix: t.to(dtype).cpu().contiguous() for name, t in feats.items()})
            for k in ("tags", "caption", "control"):
                meta.pop(k, None)
            if variants == 1:
                meta["cached_caption"] = d["caption"]
            else:
                meta["cached_captions"] = captions
        elif "txt" in ts.files:
            out["txt"] = ts.files["txt"]
        out[LATENT_EXT] = save_safetensors(tensors)
        out["json"] = meta
        yield out


def encode_shard(cfg: RunConfig, i: int, url: str, out_dir: Path, models: tuple[LatentCodec, TextFeatures | None],
                 args: argparse.Namespace, settings: dict[str, Any], env: LaunchEnv, bar: tqdm) -> dict[str, Any]:
    """Input shard i -> OUT_DIR/shard-{i:06d}.tar (atomic), then its done marker (atomic); returns the marker."""
    t0 = time.perf_counter()
    refusals = Refusals(echo=True)
    samples = list(cached_samples(cfg, i, url, *models, torch_dtype(args.dtype), refusals, bar, args.caption_variants))
    entry = {"name": None, "samples": 0, "bytes": 0, "buckets": {}}
    if samples:
        entry = write_shard(out_dir / shard_name(i), samples, bucket_cfg=cfg.data)
    marker = {"input": url, **entry, "refused": refusals.files, "settings": settings, "rank": env.rank,
              "world_size": env.world_size, "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(marker_path(out_dir, i), marker)
    return marker


def load_models(enc: CacheEncoders, args: argparse.Namespace) -> tuple[LatentCodec, TextFeatures | None]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # the same convolution algorithms on every rank and re-run
        torch.backends.cudnn.deterministic = True
    return enc.load(device)


def merge(out_dir: Path, urls: list[str], settings: dict[str, Any], cfg: RunConfig, strict: bool,
          threads: int) -> int:
    """Rank 0, once every shard has its marker: OUT_DIR/manifest.json and OUT_DIR/refused.json."""
    markers = [read_marker(out_dir, i, url, settings) for i, url in enumerate(urls)]
    assert all(m is not None for m in markers)
    shards = [{k: m[k] for k in ("name", "samples", "bytes")} for m in markers if m["name"] is not None]
    hist: Counter[str] = Counter()
    refusals = Refusals(echo=False)  # each rank printed its own as they came
    for m in markers:
        hist.update(m["buckets"])
        refusals.files.extend(m["refused"])
    data = to_dict(cfg.data)
    manifest = {"shards": shards, "samples": sum(s["samples"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "buckets": dict(sorted(hist.items())),
                "bucket_config": {k: data[k] for k in ("min_area", "max_area", "area_step", "bucket_step", "max_aspect")},
                "inputs": len(urls), "settings": settings, "torch_threads": threads}
    write_json_atomic(out_dir / MANIFEST, manifest)
    print(f"{manifest['samples']} latent samples in {len(shards)} shards ({manifest['bytes'] / 2**20:.1f} MiB), "
          f"{len(refusals.files)} refused; manifest: {out_dir / MANIFEST}")
    return refusals.finish(out_dir / REFUSED, usable=manifest["samples"], strict=strict)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="run config (data.shards, buckets, model.vae)")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="storage dtype of latents")
    ap.add_argument("--text-embeds", action="store_true", help="also cache Gemma-2 caption features")
    ap.add_argument("--caption-variants", type=int, default=1, metavar="K",
                    help="with --text-embeds: K augmented captions per sample, one drawn per epoch (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process (default: torch's)")
    ap.add_argument("--wait-timeout", type=float, default=1800.0,
                    help="rank 0 stops when no rank finished a shard for this many seconds (default 1800)")
    ap.add_argument("--override", action="append", default=[], help="config override key.sub=value (repeatable)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when anything was refused")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by `deepspeed`
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.override)
    if cfg.data.cached_latents:
        ap.error(f"{args.config}: data.cached_latents is true: data.shards must name image shards to encode")
    if args.caption_variants < 1 or (args.caption_variants > 1 and not args.text_embeds):
        ap.error("--caption-variants K needs K >= 1, and K > 1 needs --text-embeds")
    try:
        enc = get_family(cfg.family).cache_encoders(cfg, text=args.text_embeds)
    except ConfigError as e:
        ap.error(str(e))
    try:
        env = launch_env()
    except ValueError as e:
        ap.error(str(e))
    if args.device is None:
        args.device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    urls = expand_shards(cfg.data.shards)
    settings = settings_of(cfg, args, enc)
    (args.out_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    mine = env.share(range(len(urls)))
    todo = []
    for i in mine:
        try:
            if read_marker(args.out_dir, i, urls[i], settings) is None:
                todo.append(i)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"{env}: {len(mine)} of {len(urls)} input shards, {len(mine) - len(todo)} done before", flush=True)

    counts = manifest_counts([urls[i] for i in todo])
    total = sum(counts.values()) if len(counts) == len(todo) else None
    overall = tqdm(total=len(urls), desc="all ranks (shards)", position=1, disable=env.rank != 0)
    overall.update(sum(read_marker(args.out_dir, i, u, settings) is not None for i, u in enumerate(urls)))
    bar = tqdm(total=total, desc=f"rank {env.rank}/{env.world_size} (samples)", position=0 if env.rank == 0 else env.rank + 1)
    if todo:
        models = load_models(enc, args)
        for i in todo:
            encode_shard(cfg, i, urls[i], args.out_dir, models, args, settings, env, bar)
            overall.update(1)
    bar.close()
    if env.rank != 0:
        print(f"{env}: my {len(mine)} shards are done; rank 0 writes the manifest", flush=True)
        return 0

    done: set[int] = set()  # a marker once there stays: each poll reads only the missing ones

    def missing() -> list[str]:
        done.update(i for i, u in enumerate(urls) if i not in done and read_marker(args.out_dir, i, u, settings))
        return [f"{shard_name(i)} (rank {i % env.world_size})" for i in range(len(urls)) if i not in done]

    try:
        wait_for(missing, timeout=args.wait_timeout, what="finished shards",
                 on_poll=lambda n: overall.update(len(urls) - n - overall.n))
    except TimeoutError as e:
        print(f"error: rank 0: {e}", file=sys.stderr)
        return 2
    overall.close()
    return merge(args.out_dir, urls, settings, cfg, args.strict, torch.get_num_threads())


if __name__ == "__main__":
    sys.exit(main())
