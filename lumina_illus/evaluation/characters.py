"""The characters file of the recall evaluation: CSV with header `name,tag,prompt,train_samples`.

`tag` is the tagger's character tag (e.g. `shirakami_fubuki`), `prompt` the trigger prompt used in the
templates (e.g. `1girl, shirakami fubuki, hololive`), `train_samples` how many training images had it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lumina_illus.evaluation.csv_rows import int_field, read_rows, text_field

FIELDS = ("name", "tag", "prompt", "train_samples")


@dataclass(frozen=True)
class Character:
    name: str  # display name
    tag: str  # tagger character tag
    prompt: str  # trigger prompt inserted into the templates
    train_samples: int  # training images showing this character


def load_characters(path: str | Path) -> list[Character]:
    """Read and validate a characters CSV; errors name the file, line and field."""
    out = []
    for line, row in read_rows(path, FIELDS, "characters file"):
        name, tag, prompt = (text_field(path, line, row, k) for k in ("name", "tag", "prompt"))
        n = int_field(path, line, row, "train_samples")
        if n < 0:
            raise ValueError(f"{path}:{line}: field 'train_samples' = {n} must be >= 0")
        out.append(Character(name, tag, prompt, n))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate names {dup}")
    return out
