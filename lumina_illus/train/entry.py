"""The Python half of the polyglot launch scripts (launch/train_lu.sh, launch/train_sdxl.sh): run the
repository's train.py as __main__ with `--family` fixed, keeping the user's arguments."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def run_train_py(launcher: str, family: str) -> None:
    """Execute <repo>/train.py --family FAMILY <args of the launcher>; `launcher` is its __file__."""
    train_py = Path(launcher).resolve().parents[1] / "train.py"
    sys.argv = [str(train_py), "--family", family, *sys.argv[1:]]
    runpy.run_path(str(train_py), run_name="__main__")
