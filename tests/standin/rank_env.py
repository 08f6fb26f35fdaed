"""python tests/standin/rank_env.py OUT_DIR  (the training script of a launcher under test; the
deepspeed launcher puts --local_rank=N first)

Writes the launcher variables this process got to OUT_DIR/<RANK>.json and exits 0."""

import json
import os
import sys

VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(sys.argv[-1], f"{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in VARS}, f)
