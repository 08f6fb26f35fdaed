"""Who is who in a multi-node run, and what happens when the ranks disagree or one dies.

    peers = Peers.join(cfg, env, git)   # collective, right after init_distributed
    with peers.watch():                 # a collective that fails because a rank died names that rank
        ...train...

- `launch_info` reads the variables of the launchers (torchrun, deepspeed, Slurm srun) that say which
  node this process runs on; `pick_device` turns LOCAL_RANK into a device (README, Launching).
- `Peers.join` gathers every rank's identity, resolved config and git revision: a rank whose config or
  code differs from rank 0's is refused on every rank, with each differing key and both values shown.
- Rank 0 hosts a small TCP store for failure reports. A rank whose collective fails (a peer closed its
  connection, or train.collective_timeout_s passed) writes "alive" there and waits, at most
  min(collective_timeout_s, 60 s), for every other rank to answer; a rank that fails with an error of
  its own writes that error and exits. The survivors then stop with `PeerLost`, naming each rank that
  never answered (rank, node, host, pid) and each rank's own error. If rank 0 is the one that died, the
  store is gone with it, which names rank 0.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lumina_illus.config import ConfigError, ConfigErrorOnEveryRank, RunConfig, to_dict

# (variable, launcher that sets it): the first one present names this process's node
NODE_RANK_VARS = (("GROUP_RANK", "torchrun"), ("SLURM_NODEID", "slurm"), ("CROSS_RANK", "deepspeed"))
RESTART_VARS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
_KEY = "lumina_illus/"  # store key prefix
_COMM_MARKERS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timed out")


class PeerLost(RuntimeError):
    """A collective failed because other ranks died or stopped answering; the message names them."""


def pick_device(device_name: str, local_rank: int, device_count: int) -> torch.device:
    """The device of the rank with this LOCAL_RANK: on CUDA the GPU of that index among the visible ones
    (every rank of a node sees all its GPUs: deepspeed, torchrun, srun --gpus-per-node), or GPU 0 when
    the launcher bound one GPU per task (one visible); CPU ranks share the host."""
    if device_name != "cuda":
        return torch.device(device_name)
    if device_count == 1:
        return torch.device("cuda", 0)
    if not 0 <= local_rank < device_count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this node shows {device_count} GPUs: start at most "
                          f"{device_count} ranks per node (--nproc-per-node, slots=, --ntasks-per-node)")
    return torch.device("cuda", local_rank)


def launch_info(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """This process's place as its launcher describes it: node rank and which variable gave it, node
    name (SLURMD_NODENAME, else the host name), requeue/restart count, job id."""
    env = os.environ if environ is None else environ
    node, launcher = 0, "none"
    for var, name in NODE_RANK_VARS:
        if var in env:
            node, launcher = int(env[var]), name
            break
    restart = next((int(env[v]) for v in RESTART_VARS if v in env), 0)
    return {"node": node, "launcher": launcher, "host": env.get("SLURMD_NODENAME") or socket.gethostname(),
            "restart": restart, "job": env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID")}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(cfg: RunConfig, git: dict[str, Any]) -> dict[str, Any]:
    """What every rank must agree on: the resolved config (flattened keys; not the file path it came
    from) and the git revision of the code."""
    conf = {k: v for k, v in _flat(to_dict(cfg)).items() if k != "source"}
    return {**conf, "git.commit": git.get("commit"), "git.dirty": git.get("dirty")}


def differences(rows: list[dict[str, Any]]) -> list[str]:
    """Each rank's keys that differ from rank 0's, one line per (rank, key) with both values."""
    ref = rows[0]["run"]
    out = []
    for r in rows[1:]:
        ident = r["run"]
        for k in sorted(ref.keys() | ident.keys()):
            if ref.get(k) != ident.get(k):
                out.append(f"{k}: {ref.get(k)!r} on rank 0 (node {rows[0]['node']}, {rows[0]['host']}) but "
                           f"{ident.get(k)!r} on rank {r['rank']} (node {r['node']}, {r['host']})")
    return out


def _is_comm_error(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _COMM_MARKERS))


def describe(row: dict[str, Any]) -> str:
    return f"rank {row['rank']} (node {row['node']}, local rank {row['local_rank']}, host {row['host']}, pid {row['pid']})"


@dataclass
class Peers:
    rank: int
    world_size: int
    rows: list[dict[str, Any]]  # per rank: rank, local_rank, node, host, pid, device, launcher, restart, job
    timeout_s: float
    store: Any = None  # rank 0's failure-report TCPStore (None on 1 rank)

    @classmethod
    def join(cls, cfg: RunConfig, env: Any, git: dict[str, Any]) -> Peers:
        """Collective: gather every rank's identity; refuse (ConfigError on every rank) when any rank's
        config or git revision differs from rank 0's; connect to rank 0's failure-report store."""
        timeout = cfg.train.collective_timeout_s
        store = None
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if env.world_size > 1 and env.rank == 0:
            store = dist.TCPStore(addr, 0, None, True, timedelta(seconds=timeout), wait_for_workers=False)
        me = {"rank": env.rank, "local_rank": env.local_rank, "pid": os.getpid(), "device": str(env.device),
              **launch_info(), "store_port": store.port if store is not None else None,
              "run": run_identity(cfg, git)}
        rows: list[dict[str, Any]] = [{} for _ in range(env.world_size)]
        dist.all_gather_object(rows, me)
        diff = differences(rows)
        if diff:
            raise ConfigErrorOnEveryRank("every rank must run the same config and code; refused at start:\n  "
                              + "\n  ".join(diff[:20]) + (f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else ""))
        if env.world_size > 1 and env.rank != 0:
            store = dist.TCPStore(addr, rows[0]["store_port"], None, False, timedelta(seconds=timeout))
        for r in rows:
            del r["run"], r["store_port"]
        return cls(env.rank, env.world_size, rows, timeout, store)

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Turn a collective failure caused by other ranks into PeerLost naming them."""
        try:
            yield
        except Exception as e:
            lost = self.diagnose(e)
            if lost is None:
                raise
            raise lost from e

    def diagnose(self, e: BaseException) -> PeerLost | None:
        """After an exception on this rank: None when it is this rank's own error (reported to the others
        through the store) or nothing is wrong with the peers; else PeerLost naming who failed."""
        if self.store is None:
            return None
        comm = _is_comm_error(e)
        try:
            self.store.set(f"{_KEY}{'alive' if comm else 'failed'}/{self.rank}",
                           "" if comm else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        except Exception:
            if self.rank != 0:
                return PeerLost(f"{describe(self.rows[0])} is gone: its failure-report store at "
                                f"{os.environ.get('MASTER_ADDR')} does not answer (this rank: {describe(self.rows[self.rank])}; "
                                f"collective error: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return None
        if not comm:
            return None  # this rank's own error: exit with it; the others name it from the store
        wait = min(self.timeout_s, 60.0)
        answers: dict[int, str | None] = {}
        t0 = time.monotonic()
        while True:
            for r in range(self.world_size):
                if r in answers or r == self.rank:
                    continue
                try:
                    if self.store.check([f"{_KEY}failed/{r}"]):
                        answers[r] = self.store.get(f"{_KEY}failed/{r}").decode()
                    elif self.store.check([f"{_KEY}alive/{r}"]):
                        answers[r] = None
                except Exception:
                    return PeerLost(f"{describe(self.rows[0])} is gone: its failure-report store stopped answering")
            if len(answers) == self.world_size - 1 or time.monotonic() - t0 > wait:
                break
            time.sleep(0.2)
        silent = [r for r in range(self.world_size) if r != self.rank and r not in answers]
        failed = {r: msg for r, msg in answers.items() if msg is not None}
        if not silent and not failed:
            return None
        lines = [f"{describe(self.rows[r])} is gone: no answer within {wait:.0f} s of the failed collective "
                 f"(killed, out of memory, crashed, or hung; train.collective_timeout_s={self.timeout_s:g})"
                 for r in silent]
        lines += [f"{describe(self.rows[r])} failed: {msg}" for r, msg in sorted(failed.items())]
        return PeerLost("stopping: a collective failed on " + describe(self.rows[self.rank]) + " because\n  "
                        + "\n  ".join(lines))

    def table(self) -> list[dict[str, Any]]:
        """Per-rank identity for the `distributed` log event."""
        return [dict(r) for r in self.rows]
