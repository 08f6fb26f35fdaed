"""Reading the small CSV files of the evaluation (characters, WD tag lists) with errors that name the
file, the line and the field."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_rows(path: str | Path, required: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every data row; the header must hold `required`; at least one row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in required if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks {missing}; {what} needs columns {','.join(required)}")
        rows = [(line, {k: (v or "").strip() for k, v in row.items() if k}) for line, row in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path}: no rows in {what}")
    return rows


def int_field(path: str | Path, line: int, row: dict[str, str], key: str) -> int:
    try:
        return int(row[key])
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{line}: field '{key}' = {row[key]!r} is not an integer") from None


def text_field(path: str | Path, line: int, row: dict[str, str], key: str) -> str:
    if not row[key]:
        raise ValueError(f"{path}:{line}: field '{key}' is empty")
    return row[key]
