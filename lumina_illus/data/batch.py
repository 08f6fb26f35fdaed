"""The micro-batch the data pipeline hands to the trainer: a list of samples of possibly different
sizes (DiT token packing) or one size (SDXL buckets). Family-independent by design."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    keys: list[str]  # "<shard>/<key>" of each sample, for logs and bad-data reports
    captions: list[str]  # final caption text (tags ordered/shuffled, control tokens, dropout applied)
    images: list[torch.Tensor] | None = None  # each (3, H, W) float32 in [-1, 1], H and W = its bucket
    latents: list[torch.Tensor] | None = None  # each (C, h, w) when shards hold cached VAE latents
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (h, w) of the source image
    crops: list[tuple[int, int]] = field(default_factory=list)  # (top, left) of the crop after resize
    target_sizes: list[tuple[int, int]] = field(default_factory=list)  # (h, w) of the bucket
    text_embeds: list[torch.Tensor] | None = None  # cached text features per sample, if the shards hold them
    text_pooled: list[torch.Tensor] | None = None  # cached pooled text vector per sample (SDXL caches)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so host->device copies can be asynchronous."""
        for name in ("images", "latents", "text_embeds", "text_pooled"):
            xs = getattr(self, name)
            if xs is not None:
                setattr(self, name, [x.pin_memory() for x in xs])
        return self
