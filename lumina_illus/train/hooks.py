"""Periodic side jobs on live weights: the sample grid and the in-training character recall.

Under ZeRO-3 the weights are partitioned and every forward gathers them collectively, so all ranks
run the sampler together; under ZeRO-1/2 rank 0 holds full weights and samples alone.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch.distributed as dist
from PIL import Image

from lumina_illus.config import RunConfig
from lumina_illus.families import TrainingParts
from lumina_illus.train.telemetry import image_grid


def _runs_here(engine: deepspeed.DeepSpeedEngine, rank: int) -> bool:
    return engine.zero_optimization_partition_weights() or rank == 0


def sample_grid(cfg: RunConfig, engine: deepspeed.DeepSpeedEngine, parts: TrainingParts,
                rank: int) -> Image.Image | None:
    """One row per prompt, one column per size; prompt i uses seed seeds[i % len(seeds)].
    Collective under ZeRO-3. Returns the grid on rank 0, None elsewhere."""
    s = cfg.sampling
    grid = None
    if _runs_here(engine, rank):
        prompts, sizes, seeds = [], [], []
        for i, p in enumerate(s.prompts):
            for size in s.sizes:
                prompts.append(p)
                sizes.append(tuple(size))
                seeds.append(s.seeds[i % len(s.seeds)])
        engine.eval()
        images = parts.generator(engine.module).generate(prompts, sizes, seeds, steps=s.steps, guidance=s.guidance)
        engine.train()
        grid = image_grid(images, cols=len(s.sizes)) if rank == 0 else None
    dist.barrier()
    return grid


def char_recall(cfg: RunConfig, engine: deepspeed.DeepSpeedEngine, parts: TrainingParts,
                rank: int) -> dict[str, Any] | None:
    """A small char_recall (first `eval.max_characters` characters, the sample grid's sizes and
    seeds) with lumina_illus.evaluation; collective under ZeRO-3; the result on rank 0."""
    from lumina_illus.evaluation.char_recall import evaluate
    from lumina_illus.evaluation.characters import load_characters
    from lumina_illus.evaluation.tagger import WDTagger

    e = cfg.eval
    result = None
    if _runs_here(engine, rank):
        characters = load_characters(e.characters)[: e.max_characters]
        engine.eval()
        result = evaluate(
            parts.generator(engine.module), characters, WDTagger(e.tagger), sizes=[tuple(x) for x in cfg.sampling.sizes],
            seeds=cfg.sampling.seeds, steps=cfg.sampling.steps, guidance=cfg.sampling.guidance, progress=False,
        )
        engine.train()
    dist.barrier()
    return result if rank == 0 else None
