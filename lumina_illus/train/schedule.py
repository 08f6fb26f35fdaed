"""Learning-rate schedule: linear warmup, then constant or cosine decay to a floor.

A pure function of the optimizer step (nanoGPT's `get_lr`), applied by the loop to every param
group as `group_base_lr * lr_factor(step, ...)`, so param groups with their own LR (text encoders)
keep their ratio and a resumed run gets the same LR as an uninterrupted one without any scheduler
state.
"""

from __future__ import annotations

import math

from lumina_illus.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based: the step about to be taken)."""
    if step < optim.warmup_steps:
        # (step + 1) so the very first step already moves the weights
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    # cosine from 1 at the end of warmup to min_lr_ratio at max_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cos
