"""python data/cache_latents.py CONFIG.yaml OUT_DIR [--samples-per-shard 1000] [--device cuda] [--text-embeds] [--strict]

Pre-computes VAE latents of the image shards named in CONFIG's `data.shards`, with CONFIG's bucket
settings and the VAE of `model.vae` (lumina_illus.models.vae.LatentCodec), and writes them as
shards the training pipeline reads the same way (set `data.cached_latents: true` and point
`data.shards` at OUT_DIR): each sample keeps its `.txt` / `.json` (captions are still built,
shuffled and dropped at training time) and gains `{key}.latent.safetensors` {"latent": (C, h, w)}
plus json "bucket", "crop", "original_size" (what SDXL's micro-conditioning needs).

--text-embeds (families whose `model.text_encoder` is a Gemma-2 TextEncoderConfig) also stores
"text_embeds" (L, D) of one caption per sample, built once here: tag shuffling and caption
dropout are then frozen per sample (the caption used is stored as json "cached_caption").
No bad sample or shard stops the run: samples the training pipeline would skip (same reasons) and
shards that cannot be read to the end are refused with the shard and key, printed as a table by
reason and written to OUT_DIR/refused.json ({"refused": {reason: n}, "files": [{path: shard,
sample: key, reason, message}]}). Exit status 1 when no latent was written, or with --strict when
anything was refused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lumina_illus.config import RunConfig, from_dict, load_config  # noqa: E402
from lumina_illus.data.captions import CaptionConfig  # noqa: E402
from lumina_illus.data.shards import LATENT_EXT, expand_shards, iter_tar, write_shards  # noqa: E402
from lumina_illus.data.sources import REFUSED, Refusals, check_meta  # noqa: E402
from lumina_illus.data.stream import SkipSample, decode_sample  # noqa: E402
from lumina_illus.models.vae import LatentCodec, VAEConfig, torch_dtype  # noqa: E402


def cached_samples(
    cfg: RunConfig, codec: LatentCodec, text_encoder: Any, dtype: torch.dtype, refusals: Refusals
) -> Iterator[dict[str, Any]]:
    cap_cfg = from_dict(CaptionConfig, cfg.data.caption, where=f"{cfg.source}: data.caption")
    rng = random.Random(cfg.run.seed)
    urls = expand_shards(cfg.data.shards)
    for si, url in enumerate(urls):
        for ts in tqdm(iter_tar(url), desc=f"shard {si + 1}/{len(urls)}", leave=False):
            if isinstance(ts, Exception):  # the shard ends early: what it still held is lost
                refusals.add(url, getattr(ts, "reason", "truncated_tar"), str(ts))
                break
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
            out: dict[str, Any] = {"__key__": f"{si:06d}_{ts.key.replace('/', '_')}"}
            if text_encoder is not None:
                feats, mask = text_encoder.encode([d["caption"]])  # (1, L, D), (1, L)
                tensors["text_embeds"] = feats[0][mask[0]].to(dtype).cpu().contiguous()  # (L, D)
                for k in ("tags", "caption", "control"):
                    meta.pop(k, None)
                meta["cached_caption"] = d["caption"]
            elif "txt" in ts.files:
                out["txt"] = ts.files["txt"]
            out[LATENT_EXT] = save_safetensors(tensors)
            out["json"] = meta
            yield out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="run config (data.shards, buckets, model.vae)")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="storage dtype of latents")
    ap.add_argument("--text-embeds", action="store_true", help="also cache Gemma-2 caption features")
    ap.add_argument("--override", action="append", default=[], help="config override key.sub=value (repeatable)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when anything was refused")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.override)
    if cfg.data.cached_latents:
        ap.error(f"{args.config}: data.cached_latents is true: data.shards must name image shards to encode")
    vae_cfg = getattr(cfg.model, "vae", None)
    if not isinstance(vae_cfg, VAEConfig) or not vae_cfg.path:
        ap.error(f"{args.config}: model.vae.path must name a local VAE folder")
    device = torch.device(args.device)
    codec = LatentCodec(vae_cfg, device=device)
    text_encoder = None
    if args.text_embeds:
        from lumina_illus.models.text_encoder import GemmaTextEncoder, TextEncoderConfig

        te_cfg = getattr(cfg.model, "text_encoder", None)
        if not isinstance(te_cfg, TextEncoderConfig):
            ap.error(f"{args.config}: --text-embeds needs a Gemma-2 model.text_encoder section")
        text_encoder = GemmaTextEncoder(te_cfg, device=device)
    refusals = Refusals()
    manifest = write_shards(cached_samples(cfg, codec, text_encoder, torch_dtype(args.dtype), refusals), args.out_dir,
                            args.samples_per_shard, bucket_cfg=cfg.data)
    print(f"{manifest['samples']} latent samples in {len(manifest['shards'])} shards "
          f"({manifest['bytes'] / 2**20:.1f} MiB), {len(refusals.files)} refused; manifest: {args.out_dir / 'manifest.json'}")
    return refusals.finish(args.out_dir / REFUSED, usable=manifest["samples"], strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
