"""Data pipeline: webdataset shards -> decoded, bucketed, captioned micro-batches, resumable.

Trainer-facing API (lumina_illus/data/loader.py):

    from lumina_illus.data import build_loader
    loader = build_loader(cfg.data, micro_batch=cfg.train.micro_batch, rank=rank, world_size=world,
                          seed=cfg.run.seed, latent_mode=False)
    it = iter(loader)            # endless: epochs chain, so every rank always has a next batch
    batch = next(it)             # Batch: keys, captions, images (3,H,W) in [-1,1] | latents, sizes, crops
    loader.state_dict()          # global cursor (collective under torch.distributed; same dict on
                                 # every rank): save it with the checkpoint
    loader.load_state_dict(d)    # before iter(): no sample of the epoch repeated or skipped, also
                                 # when the world size changed (2 ranks -> 3)
    loader.stats()               # {"epoch", "samples_seen", "samples_per_epoch", "skipped": {reason: n},
                                 #  "packing_efficiency", "tokens_per_batch", "buckets", "recent_skips", ...}

batching "tokens": each micro-batch is packed up to cfg.token_budget image tokens
((H/patch_tokens_per_side) * (W/patch_tokens_per_side) per image) and at most micro_batch samples;
batching "bucket": micro_batch samples of one bucket.

Ranks never wait for each other at an epoch end: the stream is endless (epoch e+1 follows e in
each worker), so every rank always has a next batch and takes exactly the steps the trainer asks.
Bad samples (corrupt/truncated/empty images, truncated tars, missing caption or image, < min_side,
aspect > skip_aspect, unreadable json) are skipped, logged with shard and key, counted per reason
in stats()["skipped"], and marked consumed in the cursor.

Tools (scripts in data/, each with --help):
    python data/make_shards.py SRC_DIR_OR_INDEX OUT_DIR --samples-per-shard 1000
    python data/annotate_colors.py SRC_DIR --workers 16        # control tokens into the .json files
    python data/cache_latents.py CONFIG.yaml OUT_DIR            # VAE latents (+ --text-embeds)
    python bench/loader.py                                      # images/s per core vs a naive PIL loop

Modules: shards.py (read/write tar shards, `write_shards(samples, out_dir, samples_per_shard)`),
decode.py (robust image decoding), buckets.py (aspect buckets, resize+crop), captions.py (caption
builder, json schema), control.py (colour statistics and control tokens), packing.py (batch forming),
cursor.py (the resumable global cursor), stream.py (per-worker pipeline), loader.py (build_loader).
"""

from lumina_illus.data.batch import Batch
from lumina_illus.data.loader import Loader, build_loader
from lumina_illus.data.shards import write_shards

__all__ = ["Batch", "Loader", "build_loader", "write_shards"]
