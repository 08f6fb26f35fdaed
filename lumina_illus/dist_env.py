"""Which process of a launch this one is, read from the variables the launchers set, with no process
group: the data scripts (data/cache_latents.py, data/annotate_colors.py) split their work with it and
meet again through files, so they run the same alone, under torchrun, deepspeed, srun or mpirun.

    env = launch_env()                          # LaunchEnv(rank=1, world_size=4, local_rank=1, ...)
    mine = env.share(shards)                    # shards[1::4]: every item in exactly one rank's share
    wait_for(missing_markers, timeout=1800, what="shards")   # rank 0: the file barrier

Variables read, first group found wins (a launcher that sets two, e.g. our sbatch script exporting
RANK from SLURM_PROCID, agrees with itself):

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE          torchrun, deepspeed, launch/slurm_lu.sbatch
    OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE   mpirun (deepspeed --launcher openmpi)
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE   srun
    none of them                                            one process (rank 0 of 1)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# (launcher, rank, world size, local rank, local world size): the variable names of each launcher
LAUNCHER_VARS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int  # global rank, 0 .. world_size - 1
    world_size: int
    local_rank: int  # rank on this node
    local_world_size: int  # processes on this node (1 when the launcher does not say)
    launcher: str  # "torchrun" (also deepspeed), "openmpi", "slurm" or "none"

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world_size-th from its rank (an item's owner is index % world_size)."""
        return list(items[self.rank::self.world_size])

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}, {self.launcher})"


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch this process belongs to (module docstring); ValueError naming the variable when
    a launcher's variables are incomplete or inconsistent."""
    environ = os.environ if environ is None else environ
    for launcher, rank_v, size_v, local_v, local_size_v in LAUNCHER_VARS:
        if rank_v not in environ:
            continue
        if size_v not in environ:
            raise ValueError(f"{rank_v} is set ({environ[rank_v]}) but {size_v} is not")
        rank, size = _int(environ, rank_v), _int(environ, size_v)
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"{rank_v}={rank} is not a rank of {size_v}={size}")
        local = _int(environ, local_v) if local_v in environ else 0
        local_size = _int(environ, local_size_v) if local_size_v in environ else max(1, local + 1)
        return LaunchEnv(rank, size, local, local_size, launcher)
    return LaunchEnv(0, 1, 0, 1, "none")


def wait_for(missing: Callable[[], list[str]], *, timeout: float, what: str, poll: float = 1.0,
             on_poll: Callable[[int], None] | None = None) -> None:
    """A file barrier: call `missing()` (the names of what is not there yet) every `poll` seconds
    until it returns nothing. `on_poll(n_missing)` sees each count (a progress bar). Raises
    TimeoutError naming what is missing when nothing new arrived for `timeout` seconds (a dead rank
    stops the wait with a message, never a silent hang)."""
    last, last_change = None, time.monotonic()
    while True:
        left = missing()
        if on_poll is not None:
            on_poll(len(left))
        if not left:
            return
        if last is None or len(left) < last:
            last, last_change = len(left), time.monotonic()
        elif time.monotonic() - last_change > timeout:
            shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
            raise TimeoutError(f"no new {what} for {timeout:g} s; still missing {len(left)}: {shown} "
                               f"(did a rank die? see its log; raise --wait-timeout for slow ranks)")
        time.sleep(poll)
