"""Caption builder: turns a sample's `.txt` and `.json` into the caption text the model trains on.

Sample json schema (what data/make_shards.py, data/annotate_colors.py and the toy world write):

    {"tags": {"character": [...], "copyright": [...], "artist": [...], "general": [...], "meta": [...]},
     "caption": "natural-language caption (optional; a .txt file is used the same way)",
     "width": int, "height": int,                         # source image size (optional)
     "color": {"contrast": float, ...},                   # raw statistics (annotate_colors.py)
     "control": {"contrast": "high contrast", ...},       # control tokens (annotate_colors.py)
     "colorful": bool}                                     # the seed's saturation rule

Order: tags of `keep_order` categories come first, in that order and never dropped (a character
must stay named); tags of every other category plus the control tokens are shuffled together and
each dropped with `tag_dropout`. Captions of any length pass through untouched (the seed trains
424-token prompts); truncation to the text encoder's limit is the family's business.
"""

from __future__ import annotations

import random
from typing import Any

from lumina_illus.config import CaptionConfig  # the options live with the other config sections

__all__ = ["CaptionConfig", "CaptionError", "build_caption", "tags_of"]


class CaptionError(ValueError):
    """The sample has nothing to build a caption from."""


def _clean(tag: str, underscores: bool) -> str:
    tag = tag.strip()
    # emoticon tags (":_)", "^_^") lose their meaning with spaces
    return tag.replace("_", " ") if underscores and len(tag) > 3 else tag


def tags_of(meta: dict[str, Any]) -> dict[str, list[str]]:
    """The json's tags by category; a plain list counts as 'general'. Raises CaptionError on bad types."""
    tags = meta.get("tags") or {}
    if isinstance(tags, list):
        tags = {"general": tags}
    if not isinstance(tags, dict) or not all(isinstance(v, list) for v in tags.values()):
        raise CaptionError("json field 'tags' must map category -> list of tags")
    return {k: [str(t) for t in v if str(t).strip()] for k, v in tags.items()}


def build_caption(cfg: CaptionConfig, text: str | None, meta: dict[str, Any] | None, rng: random.Random) -> str:
    """Caption for one sample from its .txt (`text`) and .json (`meta`); raises CaptionError if both
    are empty. Randomness (shuffle, dropout, NL-vs-tags choice) comes from `rng` only."""
    meta = meta or {}
    nl = (text or "").strip() or str(meta.get("caption") or "").strip()
    tags = tags_of(meta)
    control = meta.get("control") or {}
    if not isinstance(control, dict):
        raise CaptionError("json field 'control' must map metric -> token")
    if not nl and not any(tags.values()):
        raise CaptionError("no caption: neither .txt/'caption' text nor tags")
    if rng.random() < cfg.caption_dropout:
        return ""

    u = cfg.underscores_to_spaces
    head = [_clean(t, u) for c in cfg.keep_order for t in tags.get(c, [])]
    rest = [_clean(t, u) for c, ts in tags.items() if c not in cfg.keep_order for t in ts]
    rest = [t for t in rest if rng.random() >= cfg.tag_dropout]
    tokens = [str(v) for v in control.values()] if cfg.control_tokens else []
    tokens = [t for t in tokens if rng.random() >= cfg.control_dropout]

    has_tags = bool(head or rest)
    r = rng.random()
    if nl and (not has_tags or r < cfg.nl_prob):
        # natural language: control tokens go after the sentence so the sentence stays readable
        return cfg.separator.join([nl, *tokens]) if tokens else nl
    shuffled = rest + tokens
    rng.shuffle(shuffled)
    tag_text = cfg.separator.join(head + shuffled)
    if nl and r < cfg.nl_prob + cfg.nl_and_tags_prob:
        return f"{tag_text}. {nl}" if tag_text else nl
    return tag_text
