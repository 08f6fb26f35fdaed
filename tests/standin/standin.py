"""Stand-ins for cluster commands, so the launch paths run on one machine (tests/test_multinode.py):

    srun [options] CMD ...        start SLURM_NTASKS tasks of CMD here, each with the variables Slurm sets
                                  for it (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURMD_NODENAME, ...),
                                  nodes taken from SLURM_JOB_NODELIST, SLURM_NTASKS / SLURM_NNODES tasks
                                  per node; forwards SIGTERM/SIGUSR1/SIGINT to every task; with
                                  --kill-on-bad-exit=1 a task failing kills the others; exits with the
                                  worst task status
    scontrol show hostnames LIST  one host per line (comma lists, one [a-b,c] range per name)
    pdsh ARGS ...                 writes its argv as JSON to $PDSH_ARGV_FILE and exits 0
    sinfo                         exists (DeepSpeed's slurm backend checks for it)

Each command is a two-line shell file next to this one that runs `python standin.py NAME ARGS`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: "a,b[1-3,7],c" -> a b1 b2 b3 b7 c (zero padding kept)."""
    out = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            out.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{len(lo)}d}")
    return out


def srun(argv: list[str]) -> int:
    kill_on_bad_exit = False
    while argv and argv[0].startswith("-"):  # srun options before the command
        opt = argv.pop(0)
        kill_on_bad_exit |= opt in ("--kill-on-bad-exit=1", "-K", "--kill-on-bad-exit")
    nodes = hostnames(os.environ["SLURM_JOB_NODELIST"])
    ntasks = int(os.environ["SLURM_NTASKS"])
    per_node = ntasks // len(nodes)
    tasks = []
    for rank in range(ntasks):
        node = rank // per_node
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
               "SLURM_NODEID": str(node), "SLURMD_NODENAME": nodes[node], "SLURM_STEP_ID": "0",
               "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(len(nodes)),
               "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"], "SLURM_NNODES": str(len(nodes)),
               "SLURM_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})"}
        tasks.append(subprocess.Popen(argv, env=env))

    def forward(signum: int, frame: object) -> None:
        for t in tasks:
            if t.poll() is None:
                t.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, forward)
    while any(t.poll() is None for t in tasks):
        if kill_on_bad_exit and any(t.returncode not in (None, 0) for t in tasks):
            for t in tasks:
                if t.poll() is None:
                    t.kill()
        time.sleep(0.1)
    codes = [t.returncode for t in tasks]
    return max((c if c >= 0 else 128 - c) for c in codes)


def main() -> int:
    name, argv = sys.argv[1], sys.argv[2:]
    if name == "srun":
        return srun(argv)
    if name == "scontrol":
        assert argv[:2] == ["show", "hostnames"], argv
        sys.stdout.write("".join(f"{h}\n" for h in hostnames(argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"])))
        return 0
    if name == "pdsh":
        with open(os.environ["PDSH_ARGV_FILE"], "w") as f:
            json.dump(argv, f)
        return 0
    return 0  # sinfo


if __name__ == "__main__":
    sys.exit(main())
