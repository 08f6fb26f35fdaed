"""LR schedule (pure function) and the DeepSpeed JSON derived from a run config."""

from __future__ import annotations

import math

import pytest

from lumina_illus.config import OptimConfig, RunConfig, TrainConfig
from lumina_illus.train.engine import deepspeed_config
from lumina_illus.train.schedule import lr_factor


def test_warmup_then_constant():
    o = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, o, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_floor_and_midpoint():
    o = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, o, 110) == pytest.approx(1.0)
    # halfway through the decay cos = 0: factor = floor + (1 - floor) / 2
    assert lr_factor(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, o, 110) == pytest.approx(0.1)
    assert lr_factor(500, o, 110) == pytest.approx(0.1)
    xs = [lr_factor(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))
    assert lr_factor(35, o, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))


def _cfg(**train) -> RunConfig:
    return RunConfig(family="lumina2", model=None, train=TrainConfig(**train))


def test_deepspeed_config_from_yaml_fields():
    ds = deepspeed_config(_cfg(global_batch=768, micro_batch=4, grad_accum=6, zero_stage=3, precision="bf16"))
    assert ds["train_batch_size"] == 768 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 6 and ds["gradient_clipping"] == 2.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    ds = deepspeed_config(_cfg(precision="fp32", zero_stage=2))
    assert ds["bf16"] == {"enabled": False} and "data_types" not in ds


def test_deepspeed_overrides_merge_deeply():
    ds = deepspeed_config(_cfg(deepspeed={"zero_optimization": {"reduce_bucket_size": 123}, "wall_clock_breakdown": True}))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["zero_optimization"]["stage"] == 2  # untouched keys survive the merge
    assert ds["wall_clock_breakdown"] is True
