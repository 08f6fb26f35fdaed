"""Why data is lost, by name: the keys of the loader's skip counts, of the `data/skipped_<reason>`
metrics and of the W&B "Data" section. A leaf module, so the dashboards can list them without
importing the pipeline."""

from __future__ import annotations

# a data error in one sample: skipped, counted, reported with its shard and key
SAMPLE_REASONS = (
    "empty_file",  # zero-byte image
    "corrupt_image",  # not decodable
    "truncated_image",  # decoding stopped early
    "missing_image",  # no jpg/png/webp (or latent) in the sample
    "missing_caption",  # neither .txt, json caption nor tags
    "bad_caption_encoding",  # .txt not valid UTF-8 (refused, never mangled with replacement characters)
    "bad_json",  # .json unreadable, not an object, or a field of the wrong type
    "too_small",  # a side below data.min_side
    "bad_aspect",  # more elongated than data.skip_aspect
    "bucket_leftover",  # bucket mode: a bucket never filled before the epoch after next (drop_last)
)

# a shard read that ended early; counted once per failed read (after retries) and by the samples
# lost, where the shard's manifest says how many it holds
SHARD_ERRORS = (
    "missing_shard",  # the file is not there (retried: network filesystems lose files for a moment)
    "read_error",  # an OSError while reading (retried)
    "pipe_failed",  # a "pipe:" command exited non-zero (retried)
    "truncated_tar",  # the archive ends without its end-of-archive marker, a member is shorter than its
    # header says, a header is corrupt, or it holds fewer samples than its manifest lists (not
    # retried: the file itself is short, a new read gives the same)
)
RETRIED = ("missing_shard", "read_error", "pipe_failed")

SKIP_REASONS = SAMPLE_REASONS + SHARD_ERRORS

# skipped by design, not bad data: not counted against data.max_skip_fraction
NOT_BAD = ("bucket_leftover",)
