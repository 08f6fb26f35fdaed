"""Checkpointer bookkeeping without a model: keep-last-K pruning of resume states (exports stay),
leftovers of a save killed half-way, the `latest` pointer, and the step / minute clocks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lumina_illus.config import CheckpointConfig, RunConfig, RunSection
from lumina_illus.train.checkpoint import Checkpointer, step_name


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    from lumina_illus.train.engine import _free_port

    if dist.is_initialized():  # another test module of this session already made one
        yield
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _cfg(tmp_path: Path, **ckpt) -> RunConfig:
    return RunConfig(family="lumina2", model=None, run=RunSection(name="r", out_dir=str(tmp_path)),
                     checkpoint=CheckpointConfig(**ckpt))


def _fake_step(ck: Checkpointer, step: int, with_state: bool) -> Path:
    d = ck.dir / step_name(step)
    (d / "ds" if with_state else d).mkdir(parents=True)
    (d / "lumina2.safetensors").write_bytes(b"x")
    return d


def test_prune_keeps_last_k_resume_states_and_every_export(tmp_path):
    ck = Checkpointer(_cfg(tmp_path, keep_last=2), 0, 1, {})
    dirs = [_fake_step(ck, s, with_state=s % 100 == 0) for s in (50, 100, 150, 200, 300)]
    ck.prune()
    assert [d.name for d in dirs if (d / "ds").is_dir()] == ["step_0000200", "step_0000300"]
    assert all((d / "lumina2.safetensors").is_file() for d in dirs)


def test_half_written_save_is_cleaned_and_resume_follows_latest(tmp_path):
    cfg = _cfg(tmp_path)
    ck = Checkpointer(cfg, 0, 1, {})
    assert ck.resume_path() is None  # nothing yet: fresh start
    good = _fake_step(ck, 100, with_state=True)
    (good / "ds" / "trainer_state.json").write_text("{}")
    (ck.dir / "latest").write_text(good.name)
    (ck.dir / ".tmp_step_0000200" / "ds").mkdir(parents=True)  # killed while saving step 200
    ck = Checkpointer(cfg, 0, 1, {})
    assert not (ck.dir / ".tmp_step_0000200").exists()
    assert ck.resume_path() == good
    (ck.dir / "latest").write_text("step_0000999")
    with pytest.raises(FileNotFoundError, match="step_0000999 holds no resume state"):
        ck.resume_path()


def test_clocks(tmp_path):
    ck = Checkpointer(_cfg(tmp_path, every_steps=100, every_minutes=0.001, export_every_steps=30), 0, 1, {})
    assert ck.due_by_steps(200) and not ck.due_by_steps(150)
    assert ck.export_due(90, saving_state=False) and not ck.export_due(100, saving_state=True)
    time.sleep(0.1)
    assert ck.due_by_time()
    ck = Checkpointer(_cfg(tmp_path, every_steps=0, every_minutes=0, export_every_steps=0), 0, 1, {})
    assert not ck.due_by_steps(100) and not ck.due_by_time()
    assert ck.export_due(7, saving_state=True) and not ck.export_due(7, saving_state=False)
