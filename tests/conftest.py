"""Shared test setup: deterministic CPU runs, no network, W&B offline; fixtures used by several files."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random SDXL diffusers folder (UNet, both CLIPs, VAE, tokenizers, scheduler), built once and
    only read by the tests that use it."""
    from lumina_illus.models.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny Lumina training world (lumina_illus.train.tiny_run): shards, tiny Gemma-2 and VAE and
    its run.yaml, one per test module; returns the config path."""
    from lumina_illus.train.tiny_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("trainworld"))
