"""Bytes of activations a forward keeps for backward, measured (for tests and bench/activation_checkpointing.py).

    with SavedActivations(model) as saved:
        out = model(latents, t, cap_feats, cap_mask)
    saved.nbytes  # distinct storages autograd saved, parameters excluded, + what checkpointed blocks hold

torch.autograd.graph.saved_tensors_hooks sees every tensor autograd saves outside checkpointed
blocks; a checkpointed block (torch.utils.checkpoint, non-reentrant) saves nothing through them but
holds its inputs to recompute itself, which a forward pre-hook on each checkpointed block adds.
Storages are counted once however many views of them are saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


class SavedActivations:
    """Context manager: `nbytes` saved for backward by what runs inside it (see module docstring).
    Checkpointed blocks are the modules of `model` with a true `recompute` attribute (NextDiT blocks)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.nbytes = 0
        self._storages: dict[int, int] = {}

    def _keep(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self._params:
            self._storages[s.data_ptr()] = s.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._keep(t)
        return t

    def _held_inputs(self, block: nn.Module, args: tuple) -> None:
        if getattr(block, "recompute", False) and torch.is_grad_enabled():
            for t in _tensors(args):
                self._keep(t)

    def __enter__(self) -> SavedActivations:
        self._params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self._hooks = [m.register_forward_pre_hook(self._held_inputs) for m in self.model.modules()
                       if hasattr(m, "recompute")]
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saving.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._saving.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self.nbytes = sum(self._storages.values())
