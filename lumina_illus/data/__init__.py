"""Data pipeline: webdataset shards -> decoded, bucketed, captioned micro-batches, resumable.

Trainer-facing API (lumina_illus/data/loader.py):

    from lumina_illus.data import build_loader
    loader = build_loader(cfg.data, micro_batch=cfg.train.micro_batch, rank=rank, world_size=world,
                          seed=cfg.run.seed, latent_mode=False)
    it = iter(loader)            # endless: epochs chain, so every rank always has a next batch
    batch = next(it)             # Batch: keys, captions, images (3,H,W) in [-1,1] | latents, sizes, crops
    loader.state_dict()          # global cursor (collective under torch.distributed; same dict on
                                 # every rank): save it with the checkpoint
    loader.load_state_dict(d)    # before iter(); see "Resume guarantees" below
    loader.stats()               # {"epoch", "samples_seen", "samples_per_epoch", "skipped": {reason: n},
                                 #  "shard_errors": {reason: n}, "packing_efficiency", "tokens_per_batch",
                                 #  "buckets", "recent_skips", ...}

batching "tokens": each micro-batch is packed up to cfg.token_budget image tokens
((H/patch_tokens_per_side) * (W/patch_tokens_per_side) per image) and at most micro_batch samples;
batching "bucket": micro_batch samples of one bucket.

Resume guarantees (the state is a plain JSON-able dict):
- Same layout (world size, data.num_workers, micro_batch, batching, token_budget, shuffle_buffer and
  latent mode unchanged, same shards and seed): after load_state_dict, each rank yields exactly the
  batches the uninterrupted run would have yielded from that point (same samples, order, packing
  or buckets, captions and crops), for any shuffle_buffer and across epoch boundaries. The state
  holds, per consumer (rank x worker), a snapshot taken right after its last batch the trainer
  consumed (position in its work items, shuffle RNG state, the shuffle buffer and packer/bucket
  queues by sample id) and which worker's turn is next; the resume re-reads only the samples those
  snapshots hold. Batches a worker had prefetched but the trainer had not taken are produced again.
- Any other layout (e.g. 2 ranks -> 3): no sample of the epoch is repeated or skipped, the
  remaining samples are reshuffled, and rank 0 logs that at INFO ("remaining samples are
  reshuffled ... the world changed"). States without a layout (older ones) resume this way too.
Captions, tag shuffles and crops are a function of (seed, epoch, shard, sample) in both cases.

Ranks never wait for each other at an epoch end: the stream is endless (epoch e+1 follows e in
each worker), so every rank always has a next batch and takes exactly the steps the trainer asks.
Data never vanishes without a count (reasons.py lists every reason):
- a data error in one sample (corrupt/truncated/empty image, missing caption or image, a caption
  that is not UTF-8, unreadable json or a json field of the wrong type, < min_side, aspect >
  skip_aspect) is skipped, logged with the shard and the bare tar key, counted per reason in
  stats()["skipped"], and marked consumed in the cursor. Any other exception while building a sample
  is a bug: the run stops with SampleBug naming the shard and key, with the traceback.
- a shard read that ends early is retried data.read_retries times with exponential backoff
  (data.retry_backoff_s, doubling) when a new read can help (missing_shard, read_error, pipe_failed),
  continuing after the samples already delivered; what stays is counted once per read in
  stats()["shard_errors"] and by the samples lost (its manifest's count minus those read) in
  stats()["skipped"]. A truncated archive (no end-of-archive marker, a member shorter than its
  header, a corrupt header, or fewer samples than the manifest) is `truncated_tar`; the sample being
  read when it ends is lost with the rest, never delivered without its caption.
- the trainer gathers every rank's counts each step into the `data/*` metrics (log.jsonl, W&B "Data"
  section) and stops with a checkpoint when more than data.max_skip_fraction of the last
  data.skip_window samples were bad (lumina_illus/train/data_health.py).

Tools (scripts in data/, each with --help):
    python data/make_shards.py SRC_DIR_OR_INDEX OUT_DIR --samples-per-shard 1000
    python data/annotate_colors.py SRC_DIR --workers 16        # control tokens into the .json files
    python data/cache_latents.py CONFIG.yaml OUT_DIR            # VAE latents (+ --text-embeds)
    python bench/loader.py                                      # images/s per core vs a naive PIL loop

Modules: shards.py (read/write tar shards, `write_shards(samples, out_dir, samples_per_shard)`),
decode.py (robust image decoding), buckets.py (aspect buckets, resize+crop), captions.py (caption
builder, json schema), sources.py (the data scripts' folder scan, strict sidecar readers, json field
checks and refused-file reports), reasons.py (every skip reason), control.py (colour statistics and control tokens), packing.py (batch forming),
cursor.py (the resumable global cursor), stream.py (per-worker pipeline), loader.py (build_loader).
"""

from lumina_illus.data.batch import Batch
from lumina_illus.data.loader import Loader, build_loader
from lumina_illus.data.shards import write_shards

__all__ = ["Batch", "Loader", "build_loader", "write_shards"]
