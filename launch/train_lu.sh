#!/usr/bin/env bash
""":"
# ---- bash part: `deepspeed --no_python launch/train_lu.sh ...` and `bash launch/train_lu.sh ...` ----
# To bash, the first line above is the no-op command `:` ("" + ":"); we re-run this same file with
# Python, which reads everything up to the closing quotes below as a string and runs the rest.
exec "${PYTHON:-python}" -u "$0" "$@"
exit 127
":"""

# ---- Python part: `deepspeed launch/train_lu.sh CONFIG` (the launcher runs `python -u` on it) ----
__doc__ = """deepspeed launch/train_lu.sh configs/lu2b_768.yaml [--override key=value ...]

Train the Lumina-2 family (train.py with --family lumina2). The same file runs as a Python script
(DeepSpeed's launcher default), as an executable (`deepspeed --no_python`, Slurm `srun`) and with bash:
    deepspeed --hostfile launch/hostfile.example launch/train_lu.sh configs/lu2b_768.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_lu.sh configs/toy_lu.yaml
    bash launch/train_lu.sh configs/toy_lu.yaml        # one local rank
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lumina_illus.train.entry import run_train_py  # noqa: E402

run_train_py(__file__, family="lumina2")
