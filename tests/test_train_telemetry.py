"""Step telemetry: t-bin assignment, the per-step gather across 2 real ranks (sums, straggler spread,
agreed flags), and the MFU / throughput arithmetic."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks

from lumina_illus.evaluation import metrics as M
from lumina_illus.train.data_health import DATA_FIELDS, SkipGuard
from lumina_illus.train.telemetry import StepStats, data_metrics, gather_stats, image_grid, step_metrics


def test_losses_land_in_the_bins_the_eval_expects():
    s = StepStats()
    t = torch.tensor([0.0, 0.05, 0.37, 0.999, 1.0, 0.5])
    loss = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, float("nan")])
    s.add_losses(loss, t)
    assert s.nonfinite_loss == 1 and s.loss_count == 5 and s.loss_sum == 16.0
    for ti in t.tolist()[:5]:
        assert s.bin_count[M.LOSS_T.index(M.loss_t_key(ti))] >= 1
    assert s.bin_sum[0] == 4.0 and s.bin_count[0] == 2  # t 0.0 and 0.05
    assert s.bin_sum[9] == 10.0 and s.bin_count[9] == 2  # t 0.999 and 1.0


def test_step_metrics_mfu_and_rates():
    g = {"step_time_max": 2.0, "step_time_spread": 0.1, "data_wait_frac": 0.05, "samples": 64, "tokens": 6400,
         "flops": 4e15, "loss": 0.5, "keys_crc": 7, "bin_sum": [1.0] + [0.0] * 9, "bin_count": [2] + [0] * 9,
         "data": dict.fromkeys(DATA_FIELDS, 0.0), "data_epoch": 0}
    s = StepStats(extras={"x": 3.0}, micro_batches=2)
    m = step_metrics(g, s, lr=1e-4, grad_norm=1.5, samples_seen=640, skipped=1, peak=989e12, world=8, mem=3.0)
    assert m[M.MFU] == pytest.approx(4e15 / 2.0 / (989e12 * 8))
    assert m[M.IMAGES_PER_S] == 32 and m[M.TOKENS_PER_S] == 3200
    assert m[M.LOSS_T[0]] == 0.5 and M.LOSS_T[1] not in m
    assert m[M.GRAD_NORM] == 1.5 and m["family/x"] == 1.5 and m[M.SKIPPED_STEPS] == 1
    assert M.MFU not in step_metrics(g, s, lr=1e-4, grad_norm=None, samples_seen=0, skipped=0, peak=None,
                                     world=8, mem=0.0)


def test_image_grid_layout():
    from PIL import Image

    ims = [Image.new("RGB", (64, 32), c) for c in ("red", "green", "blue")]
    grid = image_grid(ims, cols=2)
    assert grid.size == (128, 64) and grid.getpixel((70, 5)) == (0, 128, 0) and grid.getpixel((70, 40)) == (255, 255, 255)


def _gather_worker(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = StepStats(step_time=1.0 + rank, data_wait=0.5, samples=3 + rank, tokens=10, flops=1e9,
                  stop=rank == 1, save_now=rank == 1)
    s.add_losses(torch.tensor([1.0 + rank]), torch.tensor([0.15]))
    # each rank's loader counts (Loader.stats() layout): summed over ranks, epoch the newest
    skipped = {"corrupt_image": 2 + rank, "truncated_tar": 5 * rank}
    s.add_data({"skipped": skipped, "shard_errors": {"truncated_tar": rank}, "samples": 100, "tokens": 640,
                "budget": 800, "batches": 10, "epoch": rank + 1})
    g = gather_stats(s, torch.device("cpu"))
    if rank == 0:
        result.update(g)
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_sums_spread_and_flags_over_two_ranks():
    g = spawn_ranks(_gather_worker, world=2)
    assert g["samples"] == 7 and g["tokens"] == 20 and g["flops"] == 2e9
    assert g["step_time_max"] == 2.0 and g["step_time_spread"] == pytest.approx((2.0 - 1.0) / 1.5)
    assert g["data_wait_frac"] == pytest.approx((0.5 / 1 + 0.5 / 2) / 2)
    assert g["loss"] == 1.5 and g["bin_count"][1] == 2 and g["bin_sum"][1] == 3.0
    assert g["stop"] is True  # any rank's signal stops everyone
    assert g["save_now"] is False  # only rank 0's checkpoint clock counts
    m = data_metrics(g, samples_per_epoch=1000, skip_fraction=0.5)
    assert m[M.skipped_key("corrupt_image")] == 5 and m[M.skipped_key("truncated_tar")] == 5
    assert m[M.DATA_SKIPPED] == 10 and m[M.skipped_key("bad_json")] == 0  # every reason, zero included
    assert m[M.shard_errors_key("truncated_tar")] == 1 and m[M.DATA_SHARD_ERRORS] == 1
    assert m[M.DATA_EPOCH] == 2 and m[M.DATA_SAMPLES_PER_EPOCH] == 1000
    assert m[M.DATA_PACKING] == pytest.approx(1280 / 1600) and m[M.DATA_TOKENS_PER_MICRO] == 64
    assert m[M.DATA_SKIP_FRACTION] == 0.5


def _counts(delivered: float, **bad: float) -> dict[str, float]:
    d = dict.fromkeys(DATA_FIELDS, 0.0)
    d["delivered"] = delivered
    d.update({f"skipped/{r}": n for r, n in bad.items()})
    return d


def test_skip_guard_judges_the_recent_window_only():
    from lumina_illus.config import DataConfig

    g = SkipGuard(DataConfig(max_skip_fraction=0.05, skip_window=100))
    g.update(_counts(40, corrupt_image=10))  # 10 of 50: 20%, but the window is not full yet
    assert g.fraction == pytest.approx(0.2) and g.verdict() is None
    g.update(_counts(100, corrupt_image=10))  # 10 of 110 since the start: 9.1% over a full window
    assert g.verdict() is not None and "corrupt_image 10" in g.verdict() and "10 of the last 110" in g.verdict()
    for k in range(2, 5):  # clean data after that: the bad samples leave the window
        g.update(_counts(100 * k, corrupt_image=10))
    assert g.fraction == 0.0 and g.verdict() is None
    # drop_last leftovers are not bad data; lost shard samples are
    g.update(_counts(500, corrupt_image=10, bucket_leftover=50))
    assert g.verdict() is None
    g.update(_counts(600, corrupt_image=10, bucket_leftover=50, truncated_tar=30))
    assert "truncated_tar 30" in g.verdict()
