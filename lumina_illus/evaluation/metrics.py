"""Names of every metric the trainer logs and the evaluation reads back (W&B keys and log.jsonl keys).

The trainer imports these constants instead of spelling the strings, so the dashboards in
`lumina_illus.evaluation.dashboards` and the curves in `eval/char_recall.py` always point at what is
really logged.
"""

from __future__ import annotations

# training
LOSS = "train/loss"  # mean loss of the optimizer step
LOSS_T_BINS = 10  # the loss is also logged per noise-level bin t in [i/10, (i+1)/10)
LOSS_T = tuple(f"train/loss_t{i}" for i in range(LOSS_T_BINS))  # train/loss_t0 .. train/loss_t9
GRAD_NORM = "train/grad_norm"  # global gradient norm before clipping
LR = "train/lr"  # learning rate of the first param group
SAMPLES_SEEN = "train/samples_seen"  # image samples consumed over all ranks since step 0
SKIPPED_STEPS = "train/skipped_steps"  # optimizer steps skipped for a non-finite loss or grad

# performance
IMAGES_PER_S = "perf/images_per_s"  # images per second over all ranks
TOKENS_PER_S = "perf/tokens_per_s"  # image tokens per second over all ranks
MFU = "perf/mfu"  # model FLOPs utilisation, 0..1
DATA_WAIT_FRAC = "perf/data_wait_frac"  # share of the step time spent waiting for the loader
STEP_TIME_SPREAD = "perf/step_time_spread"  # (slowest - fastest rank step time) / mean: stragglers
MEM_GB = "perf/mem_gb"  # peak accelerator memory, GiB

# data health (summed over ranks, cumulative since step 0; lumina_illus/data/stream.py SKIP_REASONS)
DATA_SKIPPED = "data/skipped"  # samples skipped or lost with a shard, all reasons
DATA_SKIPPED_PREFIX = "data/skipped_"  # + reason: data/skipped_corrupt_image, data/skipped_truncated_tar, ...
DATA_SHARD_ERRORS = "data/shard_errors"  # shard reads that failed after their retries, all reasons
DATA_SHARD_ERRORS_PREFIX = "data/shard_errors_"  # + reason: data/shard_errors_pipe_failed, ...
DATA_SKIP_FRACTION = "data/skip_fraction_recent"  # bad share of the last data.skip_window samples
DATA_EPOCH = "data/epoch"  # newest epoch any rank reads from (0-based)
DATA_SAMPLES_PER_EPOCH = "data/samples_per_epoch"  # from the shards' manifests (absent when unknown)
DATA_PACKING = "data/packing_efficiency"  # image tokens / token budget of the micro-batches so far
DATA_TOKENS_PER_MICRO = "data/image_tokens_per_micro_batch"  # mean over the micro-batches so far


def skipped_key(reason: str) -> str:
    return DATA_SKIPPED_PREFIX + reason


def shard_errors_key(reason: str) -> str:
    return DATA_SHARD_ERRORS_PREFIX + reason


# validation (lumina_illus/train/validation.py): fixed held-out samples, t values and noise
VAL_LOSS = "val/loss"  # mean over every (sample, t) pair
VAL_LOSS_T = tuple(f"val/loss_t{i}" for i in range(LOSS_T_BINS))  # by the t bin of each pair
VAL_SAMPLES = "val/samples"  # held-out samples evaluated
VAL_SKIPPED = "val/skipped"  # held-out samples that could not be read (bad data)


def val_loss_t_key(t: float) -> str:
    return VAL_LOSS_T[LOSS_T.index(loss_t_key(t))]


# evaluation
CHAR_RECALL = "eval/char_recall"  # mean character recall of the in-training char_recall
SAMPLE_GRID = "samples/grid"  # wandb.Image of the sample grid


def loss_t_key(t: float) -> str:
    """The per-bin loss key of noise level t (0 = noise, 1 = data), e.g. 0.37 -> train/loss_t3."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return LOSS_T[min(int(t * LOSS_T_BINS), LOSS_T_BINS - 1)]


ALL = (LOSS, *LOSS_T, GRAD_NORM, LR, SAMPLES_SEEN, SKIPPED_STEPS, IMAGES_PER_S, TOKENS_PER_S, MFU,
       DATA_WAIT_FRAC, STEP_TIME_SPREAD, MEM_GB, DATA_SKIPPED, DATA_SHARD_ERRORS, DATA_SKIP_FRACTION, DATA_EPOCH,
       DATA_SAMPLES_PER_EPOCH, DATA_PACKING, DATA_TOKENS_PER_MICRO, VAL_LOSS, *VAL_LOSS_T, VAL_SAMPLES, VAL_SKIPPED,
       CHAR_RECALL, SAMPLE_GRID)
