"""Distributed, resumable preprocessing (issue 16, item 3), run as users run it: data/cache_latents.py and
data/annotate_colors.py in real processes under the launchers' variables (RANK/WORLD_SIZE, torchrun,
SLURM_*), a rank SIGKILLed part-way, a re-run, and the outputs compared with a one-process run.

"Identical" (cache_latents' docstring): the same shard names, manifest and refused-files report, and
every tar member byte for byte (latents bit-identical: all runs use one intra-op thread)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lumina_illus.data.shards import write_shards
from lumina_illus.dist_env import LaunchEnv, launch_env

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 6, 3


def _env(**extra: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **extra}


def start(script: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "data" / script), *args], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def png(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 image shards of 3 samples (sizes that land in 3 buckets, one corrupt image), a tiny Flux VAE and
    a tiny Gemma-2."""
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(N_SHARDS * PER_SHARD):
        h, w = [(96, 96), (64, 128), (128, 80)][i % 3]
        s = {"__key__": f"img{i:03d}", "png": png(rng, h, w), "json": {"tags": {"character": [f"c{i % 4}"],
                                                                              "general": ["smile", "sky", "hat"]}}}
        if i == 13:
            s["png"] = b"not an image" * 8
        if i % 2:
            s["txt"] = f"picture number {i}"
        samples.append(s)
    write_shards(samples, root / "in", PER_SHARD)
    make_tiny_flux_vae(root / "vae")
    make_tiny_gemma2(root / "gemma", vocab_corpus=["c0 c1 c2 c3 smile sky hat picture number"] +
                     [str(i) for i in range(20)])
    return root


def write_config(inputs: Path, shards: list[str], path: Path) -> Path:
    data = {"shards": shards, "min_area": 64 * 64, "max_area": 96 * 96, "area_step": 32, "bucket_step": 32,
            "patch_tokens_per_side": 16, "random_crop": True, "num_workers": 0,
            "caption": {"caption_dropout": 0.0}}  # tags shuffled: the per-sample random stream matters
    model = {"arch": {"preset": "tiny"}, "vae": {"path": str(inputs / "vae")},
             "text_encoder": {"path": str(inputs / "gemma"), "dtype": "fp32"}}
    path.write_text(yaml.safe_dump({"family": "lumina2", "model": model, "data": data}))
    return path


def members(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    """shard name -> [(member name, bytes)] in tar order."""
    got = {}
    for p in sorted(out.glob("shard-*.tar")):
        with tarfile.open(p) as tar:
            got[p.name] = [(m.name, tar.extractfile(m).read()) for m in tar]
    return got


def reports(out: Path) -> tuple[dict, dict]:
    """The manifest and the refused-files report (PIL's messages name object addresses: masked)."""
    refused = re.sub(r" at 0x[0-9a-f]+", " at 0x", (out / "refused.json").read_text())
    return json.loads((out / "manifest.json").read_text()), json.loads(refused)


def assert_same_output(got: Path, want: Path) -> None:
    g, w = members(got), members(want)
    assert list(g) == list(w)
    for name in w:
        assert [m for m, _ in g[name]] == [m for m, _ in w[name]], name
        for (m, a), (_, b) in zip(g[name], w[name]):
            assert a == b, f"{name}/{m} differs"
    assert reports(got) == reports(want)


def every_sample_once(out: Path) -> list[str]:
    keys = [m.split(".", 1)[0] for ms in members(out).values() for m, _ in ms if m.endswith(".latent.safetensors")]
    assert len(keys) == len(set(keys)), "a sample written twice"
    return sorted(keys)


@pytest.mark.slow
def test_cache_latents_two_ranks_sigkill_then_torchrun_rerun_equals_one_process(inputs: Path, tmp_path: Path) -> None:
    # input 3 (rank 1's second shard) is a pipe command that waits for a gate file, like a slow download:
    # rank 1 is surely between its first and second shard when it is killed
    gate = tmp_path / "gate"
    shards = [str(inputs / "in" / f"shard-{i:06d}.tar") for i in range(N_SHARDS)]
    shards[3] = f"pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {shards[3]}"
    cfg = write_config(inputs, shards, tmp_path / "gated.yaml")
    out, ref = tmp_path / "dist", tmp_path / "one"
    args = (str(cfg), str(out), "--dtype", "fp32", "--device", "cpu")
    try:
        ranks = [start("cache_latents.py", *args, "--wait-timeout", "4", RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
                 for r in (0, 1)]
        first = out / "done" / "shard-000001.json"
        deadline = time.monotonic() + 120
        while not first.exists():
            assert ranks[1].poll() is None, ranks[1].communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ranks[1].send_signal(signal.SIGKILL)
        rc1, _, _ = finish(ranks[1])
        rc0, out0, err0 = finish(ranks[0])
        assert rc1 == -signal.SIGKILL
        # rank 0 did its share, then gave up waiting, naming what is missing and whose it is
        assert rc0 == 2, err0[-3000:]
        assert "shard-000003.tar (rank 1)" in err0 and "shard-000005.tar (rank 1)" in err0
        assert sorted(p.name for p in (out / "done").glob("*.json")) == [f"shard-00000{i}.json" for i in (0, 1, 2, 4)]
        assert not (out / "manifest.json").exists()
        for p in out.glob("shard-*.tar"):  # whatever has a final name is a whole shard
            with tarfile.open(p) as tar:
                assert len(tar.getmembers()) >= 2
        before = first.read_text()

        gate.touch()  # the re-run: under torchrun this time
        rerun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", str(ROOT / "data" / "cache_latents.py"), *args],
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        one = start("cache_latents.py", str(cfg), str(ref), "--dtype", "fp32", "--device", "cpu")
        results = [finish(p) for p in (rerun, one)]
    finally:
        gate.touch()  # releases a pipe command left waiting by a failed run
    for rc, _, e in results:
        assert rc == 0, e[-3000:]
    assert "rank 0/2 (local 0/2, torchrun): 3 of 6 input shards, 3 done before" in results[0][1]
    assert "rank 1/2 (local 1/2, torchrun): 3 of 6 input shards, 1 done before" in results[0][1]
    assert first.read_text() == before  # skipped, not redone
    assert "1 refused" in results[0][1] and "corrupt_image" in results[1][2]

    keys = every_sample_once(out)
    want = [f"{i // PER_SHARD:06d}_img{i:03d}" for i in range(N_SHARDS * PER_SHARD) if i != 13]
    assert keys == want
    assert_same_output(out, ref)
    manifest, refused = reports(out)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(N_SHARDS)]
    assert manifest["samples"] == 17 and refused["refused"] == {"corrupt_image": 1}


@pytest.mark.slow
def test_cache_latents_text_embeds_on_two_ranks_equals_one_process(inputs: Path, tmp_path: Path) -> None:
    cfg = write_config(inputs, [str(inputs / "in" / "shard-{000000..000005}.tar")], tmp_path / "plain.yaml")
    common = (str(cfg), "--dtype", "fp32", "--device", "cpu", "--text-embeds")
    ranks = [start("cache_latents.py", common[0], str(tmp_path / "dist"), *common[1:], RANK=str(r), WORLD_SIZE="2")
             for r in (0, 1)]
    one = start("cache_latents.py", common[0], str(tmp_path / "one"), *common[1:])
    for rc, _, err in [finish(p) for p in (*ranks, one)]:
        assert rc == 0, err[-3000:]
    done = [json.loads(p.read_text()) for p in sorted((tmp_path / "dist" / "done").glob("*.json"))]
    assert [(m["rank"], m["world_size"]) for m in done] == [(i % 2, 2) for i in range(N_SHARDS)]
    assert_same_output(tmp_path / "dist", tmp_path / "one")
    for _, ms in members(tmp_path / "dist").items():
        metas = [json.loads(b) for m, b in ms if m.endswith(".json")]
        assert all("cached_caption" in m and "tags" not in m for m in metas)
    # a re-run with other settings into the same folder is refused, naming what differs
    p = start("cache_latents.py", common[0], str(tmp_path / "dist"), "--dtype", "bf16", "--device", "cpu", "--text-embeds")
    rc, _, err = finish(p)
    assert rc == 1 and "dtype" in err and "fp32" in err and "bf16" in err


def color_folder(root: Path, n: int = 12) -> None:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        a = (rng.integers(0, 255, (48, 64, 3)).astype(np.float64) * (i + 1) / n).astype(np.uint8)
        Image.fromarray(a).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.json").write_text(json.dumps({"tags": [f"t{i}"]}))
    (root / "broken.png").write_bytes(b"garbage" * 20)
    (root / "img05.json").write_text('{"tags": ')  # refused by whichever rank owns img05


def jsons(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(root.glob("*.json"))}


@pytest.mark.slow
def test_annotate_colors_under_srun_variables_waits_for_every_rank_and_equals_one_process(tmp_path: Path) -> None:
    color_folder(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "dist")
    ref = start("annotate_colors.py", str(tmp_path / "one"), "--workers", "1")
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    rank0 = start("annotate_colors.py", str(tmp_path / "dist"), "--workers", "1",
                  SLURM_PROCID="0", SLURM_LOCALID="0", **slurm)
    marker0 = tmp_path / "dist" / ".color_pass1" / "rank00000-of-00002.json"
    deadline = time.monotonic() + 120
    while not marker0.exists():  # rank 1 starts only once rank 0 waits: quartiles need all of pass 1
        assert rank0.poll() is None, rank0.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert rank0.poll() is None and not (tmp_path / "dist" / "color_quartiles.json").exists()
    rank1 = start("annotate_colors.py", str(tmp_path / "dist"), "--workers", "1",
                  SLURM_PROCID="1", SLURM_LOCALID="1", **slurm)
    results = [finish(p) for p in (rank0, rank1, ref)]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "rank 1/2 (local 1/2, slurm)" in results[1][1]
    assert "13 images, 2 refused, 11 jsons updated" in results[0][1]
    got, want = jsons(tmp_path / "dist"), jsons(tmp_path / "one")
    for name in want:  # statistics, quartiles, tokens: as one process computes them
        if name != "color_refused.json":
            assert got[name] == want[name], name
    rep = {f["path"]: f["reason"] for f in json.loads(got["color_refused.json"])["files"]}
    assert rep == {str(tmp_path / "dist" / "broken.png"): "corrupt_image", str(tmp_path / "dist" / "img05.json"): "bad_json"}


def test_launch_env_reads_each_launcher_and_splits_every_item_once() -> None:
    assert launch_env({}) == LaunchEnv(0, 1, 0, 1, "none")
    assert launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        LaunchEnv(3, 4, 1, 2, "torchrun")
    assert launch_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                       "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == LaunchEnv(5, 8, 1, 4, "openmpi")
    assert launch_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}) == LaunchEnv(2, 4, 0, 1, "slurm")
    # a launcher's own variables win over Slurm's (launch/slurm_lu.sbatch exports RANK from SLURM_PROCID)
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).rank == 1
    for bad, word in [({"RANK": "1"}, "WORLD_SIZE"), ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
                      ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID")]:
        with pytest.raises(ValueError, match=word):
            launch_env(bad)
    items = list(range(23))
    shares = [LaunchEnv(r, 4, 0, 1, "torchrun").share(items) for r in range(4)]
    assert sorted(x for s in shares for x in s) == items
