"""Past one machine, simulated on one: two "nodes" of 1 CPU rank each, on the tiny world of
lumina_illus.train.tiny_run, under the launchers users run (README, Launching):

- torchrun --nnodes 2 (c10d rendezvous), started twice: unique global ranks, one node each, each
  rank's device recorded; only global rank 0 writes run-level files (every file write of every process
  is audited by tests/write_audit/sitecustomize.py); one epoch reads every sample exactly once.
- launch/slurm_lu.sbatch with tests/standin/srun and scontrol first on PATH (tasks get the variables
  Slurm sets): a checkpoint, SIGTERM to every process (Slurm's preemption), then the requeue
  (SLURM_RESTART_COUNT=1) resumes and logs the same losses and data as the uninterrupted torchrun run.
- `deepspeed --hostfile --launcher pdsh`: only its command line (pdsh stand-in records it), then each
  node's command run here with pdsh's %n filled in and the training script replaced by an env dump.
- Bad input: a node started with another config is refused on both nodes with the key and both values;
  a rank killed mid-run makes the survivor stop within train.collective_timeout_s, naming it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import ROOT, _wait_for_step, read_log  # noqa: E402

STANDIN = ROOT / "tests" / "standin"
AUDIT_SITE = ROOT / "tests" / "write_audit"
EPOCH = 12  # tiny world: 48 samples, global batch 4


def _env(audit: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        env.update(PYTHONPATH=f"{AUDIT_SITE}:{ROOT}", LUMINA_WRITE_AUDIT=str(audit))
    return env


def torchrun_nodes(cfg: Path, *overrides: str, node_extra: tuple[tuple[str, ...], ...] = ((), ()),
                   audit: Path | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents (one per simulated node, 1 rank each) meeting at one c10d rendezvous."""
    from lumina_illus.train.engine import _free_port

    port = _free_port()
    procs = []
    for extra in node_extra:
        args = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"sim{port}", "train.py", str(cfg),
                "--override", *overrides, *extra]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(audit), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def finish_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    return [p.communicate(timeout=timeout)[0] for p in procs]


def audit_records(audit: Path) -> list[dict]:
    return [json.loads(line) for f in audit.glob("*.jsonl") for line in f.read_text().splitlines()]


def distributed_ranks(run_dir: Path) -> list[dict]:
    _, events = read_log(run_dir)
    return [e for e in events if e["event"] == "distributed"][-1]["ranks"]


# shuffle_buffer=1: with a buffer, each worker's epoch tail mixes with the next epoch's head (the stream
# is endless), so the first EPOCH steps would not be exactly one epoch
COMMON = (f"train.max_steps={EPOCH}", "telemetry.log_sample_keys=true", "checkpoint.every_steps=3",
          "checkpoint.export_dtype=fp32", "data.shuffle_buffer=1")


@pytest.fixture(scope="module")
def epoch_run(world, tmp_path_factory):
    """One epoch on two torchrun nodes, W&B offline, every file write audited."""
    audit = tmp_path_factory.mktemp("audit")
    t0 = time.time()
    procs = torchrun_nodes(world, "run.name=tr2", "telemetry.wandb_mode=offline", *COMMON, audit=audit)
    outs = finish_all(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    print(f"torchrun 2-node epoch: {time.time() - t0:.1f} s")
    return world.parent / "runs" / "tr2", audit


@pytest.mark.slow
def test_torchrun_two_nodes_ranks_files_and_one_epoch(epoch_run):
    run_dir, audit = epoch_run
    ranks = distributed_ranks(run_dir)
    # unique global ranks, one per node, each with the local rank and device it chose
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sorted(r["node"] for r in ranks) == [0, 1] and {r["launcher"] for r in ranks} == {"torchrun"}
    assert [(r["local_rank"], r["device"]) for r in ranks] == [(0, "cpu"), (0, "cpu")]
    assert len({r["pid"] for r in ranks}) == 2
    # every sample of the epoch read exactly once across the nodes, each step's keys from both ranks
    steps, events = read_log(run_dir)
    keys = [e["keys"] for e in events if e["event"] == "data_keys"]
    assert len(keys) == EPOCH and all(len(k) == 2 and len(k[0]) == len(k[1]) == 2 for k in keys)
    read = [k for step in keys for rank in step for k in rank]  # "<shard>/<key>"
    assert sorted(k.split("/")[1] for k in read) == [f"s{i:03d}" for i in range(48)]
    shards = [{k.split("/")[0] for step in keys for k in step[r]} for r in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 3  # 6 shards, split by global rank
    assert steps[EPOCH]["train/samples_seen"] == 48
    # only global rank 0 writes run-level files; the other rank writes only its own checkpoint shards
    writes = [r for r in audit_records(audit) if r["path"].startswith(str(run_dir) + "/")]
    rel = {(r["rank"], os.path.relpath(r["path"], run_dir)) for r in writes}
    others = {p for rank, p in rel if rank != "0"}
    assert others, "the audit saw no write by rank 1 (positive control)"
    assert all(p.split("/")[0] == "ckpt" and p.split("/")[2] == "ds" for p in others), sorted(others)
    assert any(p.endswith("rank_00001.json") for p in others)
    mine = {p for rank, p in rel if rank == "0"}
    for f in ("config.yaml", "log.jsonl", "wandb_id.txt", "ckpt/latest", "ckpt/step_0000012",
              "ckpt/.tmp_step_0000012/meta.json"):
        assert f in mine, (f, sorted(mine))
    assert any(p.startswith("wandb/") for p in mine) and len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_slurm_sbatch_sigterm_and_requeue_resume_exactly(world, epoch_run):
    from lumina_illus.train.engine import _free_port

    ref_steps, _ = read_log(epoch_run[0])
    run_dir = world.parent / "runs" / "slurm"

    def sbatch(restart: int) -> subprocess.Popen:
        env = _env(PATH=f"{STANDIN}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="lu2b_768",
                   SLURM_JOB_NODELIST="localhost,simnode1", SLURM_NNODES="2", SLURM_NTASKS="2",
                   SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT=str(restart),
                   MASTER_PORT=str(_free_port()))
        return subprocess.Popen(["bash", "launch/slurm_lu.sbatch", str(world), "--override", "run.name=slurm",
                                 *COMMON], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    job = sbatch(0)
    _wait_for_step(run_dir, 4, job)  # the step-3 checkpoint is complete before step 4 logs
    os.killpg(job.pid, signal.SIGTERM)  # preemption: Slurm signals every process of the job
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    stop = [e for e in events if e["event"] == "stopped_by_signal"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM"
    last = stop[0]["step"]
    assert 4 <= last < EPOCH and (run_dir / "ckpt" / "latest").read_text() == f"step_{last:07d}"

    job = sbatch(1)  # the requeued job
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 0, out[-3000:]
    steps, events = read_log(run_dir)
    assert any(e["event"] == "resumed" and e["step"] == last for e in events)
    ranks = distributed_ranks(run_dir)
    assert [(r["rank"], r["node"], r["local_rank"], r["host"]) for r in ranks] == [
        (0, 0, 0, "localhost"), (1, 1, 0, "simnode1")]
    assert all(r["launcher"] == "slurm" and r["restart"] == 1 and r["job"] == "4242" for r in ranks)
    assert sorted(steps) == list(range(1, EPOCH + 1))
    for s in range(1, EPOCH + 1):  # the same run as the uninterrupted 2-node torchrun one
        assert steps[s]["data/keys_crc"] == ref_steps[s]["data/keys_crc"], f"data differs at step {s}"
        assert steps[s]["train/loss"] == ref_steps[s]["train/loss"], f"loss differs at step {s}"


@pytest.mark.slow
def test_node_with_another_config_is_refused_naming_the_key(world):
    procs = torchrun_nodes(world, "run.name=mismatch", node_extra=((), ("optim.lr=0.002",)))
    outs = finish_all(procs, timeout=120)
    for p, out in zip(procs, outs):
        assert p.returncode != 0
        assert "every rank must run the same config and code" in out, out[-3000:]
        # rendezvous order decides which node gets rank 0: the line names both values either way
        line = next(x for x in out.splitlines() if x.strip().startswith("optim.lr:"))
        assert "0.001" in line and "0.002" in line and "rank 0" in line and "rank 1" in line
        assert "train.max_steps" not in out
    assert not (world.parent / "runs" / "mismatch" / "log.jsonl").exists()


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_naming_it(world):
    timeout = 8
    run_dir = world.parent / "runs" / "dead"
    procs = torchrun_nodes(world, "run.name=dead", "train.max_steps=400", "checkpoint.every_steps=0",
                           f"train.collective_timeout_s={timeout}")
    _wait_for_step(run_dir, 3, procs[0])
    victim = distributed_ranks(run_dir)[1]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.time()
    outs = finish_all(procs, timeout=120)
    assert time.time() - t0 < timeout + 20, time.time() - t0
    out = "\n".join(outs)
    assert all(p.returncode != 0 for p in procs)
    assert (f"rank 1 (node {victim['node']}, local rank 0, host {victim['host']}, pid {victim['pid']}) is gone"
            in out), out[-4000:]
    assert f"train.collective_timeout_s={timeout}" in out


def test_deepspeed_pdsh_command_gives_each_node_its_rank(tmp_path):
    """`deepspeed --hostfile` with the pdsh launcher: the command it hands pdsh, then each node's part run
    here (pdsh's %n = the host's index) under a bare environment plus the launcher's exports."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    argv_file = tmp_path / "pdsh_argv.json"
    env = _env(PATH=f"{STANDIN}:{os.environ['PATH']}", PDSH_ARGV_FILE=str(argv_file))
    r = subprocess.run(["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--no_ssh_check",
                        "--master_addr", "127.0.0.1", "--master_port", "29877", "tests/standin/rank_env.py",
                        str(tmp_path / "env")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    argv = json.loads(argv_file.read_text())
    assert argv[:5] == ["-S", "-f", "1024", "-w", "node-a,node-b"]
    remote = " ".join(argv[5:])
    world_info = next(a for a in argv if a.startswith("--world_info=")).split("=", 1)[1]
    assert json.loads(base64.urlsafe_b64decode(world_info)) == {"node-a": [0, 1], "node-b": [0, 1]}
    assert "--node_rank=%n" in argv and "--master_addr=127.0.0.1" in argv and "--master_port=29877" in argv
    assert f"cd {ROOT};" in argv and f"export PYTHONPATH={ROOT}" in remote
    (tmp_path / "env").mkdir()
    bare = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DS_ACCELERATOR": "cpu"}
    for node in (0, 1):
        p = subprocess.run(["bash", "-c", remote.replace("%n", str(node))], env=bare, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
    seen = sorted((json.loads(f.read_text()) for f in (tmp_path / "env").glob("*.json")), key=lambda e: int(e["RANK"]))
    assert [(e["RANK"], e["LOCAL_RANK"], e["CROSS_RANK"]) for e in seen] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"], e["LOCAL_SIZE"]) for e in seen} == {
        ("4", "127.0.0.1", "29877", "2")}
    from lumina_illus.train.cluster import launch_info
    assert [launch_info(e)["node"] for e in seen] == [0, 0, 1, 1]


def test_pick_device_per_local_rank():
    from lumina_illus.config import ConfigError
    from lumina_illus.train.cluster import pick_device

    assert [pick_device("cuda", lr, 8) for lr in range(8)] == [torch.device("cuda", i) for i in range(8)]
    assert pick_device("cuda", 5, 1) == torch.device("cuda", 0)  # one GPU bound per task (srun --gpu-bind)
    assert pick_device("cpu", 3, 0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK=8 but this node shows 8 GPUs"):
        pick_device("cuda", 8, 8)


def test_launch_info_reads_each_launcher():
    from lumina_illus.train.cluster import launch_info

    torchrun = launch_info({"GROUP_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_RUN_ID": "j"})
    assert (torchrun["node"], torchrun["launcher"], torchrun["restart"], torchrun["job"]) == (1, "torchrun", 2, "j")
    slurm = launch_info({"SLURM_NODEID": "3", "SLURMD_NODENAME": "gpu-07", "SLURM_RESTART_COUNT": "1",
                         "SLURM_JOB_ID": "99"})
    assert (slurm["node"], slurm["launcher"], slurm["host"], slurm["restart"], slurm["job"]) == (
        3, "slurm", "gpu-07", 1, "99")
    assert launch_info({"CROSS_RANK": "2"})["node"] == 2 and launch_info({})["launcher"] == "none"


def test_differences_name_each_key_and_both_values():
    from lumina_illus.train.cluster import differences

    row = {"node": 0, "host": "a", "rank": 0, "run": {"optim.lr": 1e-3, "git.commit": "abc", "x": 1}}
    other = {"node": 1, "host": "b", "rank": 1, "run": {"optim.lr": 1e-3, "git.commit": "def", "x": 1}}
    assert differences([row, dict(row, rank=1)]) == []
    assert differences([row, other]) == ["git.commit: 'abc' on rank 0 (node 0, a) but 'def' on rank 1 (node 1, b)"]


def test_srun_tasks_without_rank_are_refused_not_trained_alone(world) -> None:
    """A bare `srun -n 2 python train.py` (no RANK): every task would train alone into the same folder."""
    from lumina_illus.train.engine import check_not_orphan_task

    check_not_orphan_task({})  # python train.py alone
    check_not_orphan_task({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})  # a batch shell, not an srun step
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK")}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", DS_ACCELERATOR="cpu")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "train.py", str(world), "--override", "run.name=orphan"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "task 1 of 2 of an srun step but no RANK/WORLD_SIZE" in r.stderr and "slurm_lu.sbatch" in r.stderr
    assert not (world.parent / "runs" / "orphan").exists()  # refused before anything was written
