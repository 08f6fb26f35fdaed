"""Every command in README.md points at something that exists and accepts its arguments' shape:
scripts exist and answer --help, configs named in commands load, quickstart's own commands likewise.
(The quickstart itself runs end to end in .ci/run's time budget only by hand: it trains for minutes.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _code_lines(text: str) -> list[str]:
    """Lines of fenced (```) and indented (4 spaces) code blocks; a line ending in a backslash continues
    on the next one, as in a shell."""
    out, fenced, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            line = pending + line.strip()
            pending = line[:-1] + " " if line.endswith("\\") else ""
            if not pending:
                out.append(line)
    return out


def _commands(text: str) -> list[list[str]]:
    cmds = []
    for line in _code_lines(text):
        for part in line.split("&&"):
            part = part.split("#")[0].strip()
            if re.match(r"^(DS_ACCELERATOR=\S+ )?(python|deepspeed|bash|sbatch|pip|huggingface-cli)\b", part):
                cmds.append(shlex.split(part))
    return cmds


README_COMMANDS = _commands((ROOT / "README.md").read_text())


def _entry(cmd: list[str]) -> tuple[list[str], list[str]] | None:
    """(python argv that runs the command's entry point, config files it names) or None when the command
    is an installer / downloader."""
    cmd = [c for c in cmd if not c.startswith("DS_ACCELERATOR=")]
    configs = [c for c in cmd if c.startswith("configs/") and c.endswith(".yaml")]
    tool, rest = cmd[0], cmd[1:]
    if tool in ("pip", "huggingface-cli"):
        return None
    if tool == "python":
        if rest[0] == "-m" and rest[1] == "pytest":
            return None
        if rest[0] == "-m":
            return [sys.executable, "-m", rest[1]], configs
        return [sys.executable, rest[0]], configs
    # deepspeed [--opts] script ... / bash script / sbatch script: the script is the first path-like arg
    if "--hostfile" in rest:
        hostfile = rest.pop(rest.index("--hostfile") + 1)
        assert (ROOT / hostfile).is_file(), f"README: hostfile {hostfile} missing"
    script = next(a for a in rest if "/" in a and not a.startswith("configs/"))
    if tool == "deepspeed":
        return [sys.executable, script], configs
    return ["bash", script], configs


def test_readme_top_is_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:4] == [
        "```bash",
        "bash launch/quickstart.sh",
        'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest',
        "```",
    ]


ENTRIES = sorted({(tuple(e[0]), tuple(e[1])) for c in README_COMMANDS if (e := _entry(c)) is not None})


def test_readme_has_commands_for_every_topic():
    text = " ".join(" ".join(c) for c in README_COMMANDS)
    for needle in ("launch/quickstart.sh", "data/make_shards.py", "data/annotate_colors.py", "--hostfile",
                   "sbatch", "eval/char_recall.py", "eval/dashboards.py", "--layout diffusers", "--layout comfy"):
        assert needle in text, needle


@pytest.mark.parametrize("argv,configs", ENTRIES, ids=[" ".join(a)[-50:] for a, _ in ENTRIES])
def test_readme_command_entry_exists_and_answers_help(argv, configs):
    from lumina_illus.config import load_config

    target = argv[-1]
    if argv[1] != "-m":
        assert (ROOT / target).is_file(), f"README names {target}, which does not exist"
    if not target.endswith(".sbatch"):  # sbatch files only run under Slurm
        r = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"{' '.join(argv)} --help failed:\n{r.stderr[-2000:]}"
    for c in configs:
        load_config(ROOT / c)
