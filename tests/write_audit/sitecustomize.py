"""Write audit for the multi-node tests: with this folder first on PYTHONPATH and LUMINA_WRITE_AUDIT set to
a folder, every Python process records each file it creates, opens for writing, renames, or each folder
it makes, as JSON lines {"rank": $RANK or null, "event", "path"} in LUMINA_WRITE_AUDIT/<pid>.jsonl
(sys.addaudithook; writes done in native code, e.g. safetensors' save_file, show as the rename that
publishes them). tests/test_multinode.py reads it to tell which global rank wrote which run file.
"""

import json
import os
import sys

_DIR = os.environ.get("LUMINA_WRITE_AUDIT")
if _DIR:
    _fd = os.open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(event: str, path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            line = json.dumps({"rank": os.environ.get("RANK"), "event": event, "path": os.path.abspath(os.fsdecode(path))})
            os.write(_fd, (line + "\n").encode())

    def _hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
                _record("open", path)
        elif event == "os.rename":
            _record("rename", args[1])
        elif event == "os.mkdir":
            _record("mkdir", args[0])

    sys.addaudithook(_hook)
