"""The characters file of the recall evaluation: CSV with header `name,tag,prompt,train_samples`.

`tag` is the tagger's character tag (e.g. `shirakami_fubuki`), `prompt` the trigger prompt used in the
templates (e.g. `1girl, shirakami fubuki, hololive`), `train_samples` how many training images had it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("name", "tag", "prompt", "train_samples")


@dataclass(frozen=True)
class Character:
    name: str  # display name
    tag: str  # tagger character tag
    prompt: str  # trigger prompt inserted into the templates
    train_samples: int  # training images showing this character


def load_characters(path: str | Path) -> list[Character]:
    """Read and validate a characters CSV; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: characters file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks {missing}; expected columns {','.join(FIELDS)}")
        out: list[Character] = []
        for line, row in enumerate(reader, start=2):
            for k in ("name", "tag", "prompt"):
                if not (row[k] or "").strip():
                    raise ValueError(f"{path}:{line}: field '{k}' is empty")
            try:
                n = int(row["train_samples"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: field 'train_samples' = {row['train_samples']!r} is not an integer"
                ) from None
            if n < 0:
                raise ValueError(f"{path}:{line}: field 'train_samples' = {n} must be >= 0")
            out.append(Character(row["name"].strip(), row["tag"].strip(), row["prompt"].strip(), n))
    if not out:
        raise ValueError(f"{path}: no characters")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate names {dup}")
    return out
