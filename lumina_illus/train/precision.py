"""What precision a run really trains in, read off the live DeepSpeed engine (not the config we
asked for): the dtype forward/backward run in, the master weights the optimizer updates, the Adam
states, and the dtype gradients are accumulated in across micro-batches. The loop writes it once per
process as the `precision` event of log.jsonl, after the first optimizer step (the Adam states exist
from then on).

bf16 in lumina_illus means: bf16 module weights and activations; fp32 master weights, fp32 Adam
states and fp32 gradient accumulation (deepspeed_config sets data_types.grad_accum_dtype = fp32).
"""

from __future__ import annotations

from typing import Any

import torch


def _dtypes(tensors: Any) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if torch.is_tensor(t) and t.numel() > 0})


def precision_report(engine: Any) -> dict[str, Any]:
    """{"module": [...], "master": [...], "optimizer_states": [...], "grad_accum": str | None,
    "optimizer": class name} from a DeepSpeed engine after at least one optimizer step."""
    opt = engine.optimizer  # DeepSpeed's ZeRO / bf16 wrapper around our torch AdamW
    master = (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
              or getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
              or getattr(opt, "fp32_groups_flat_partition", None))  # BF16_Optimizer (ZeRO-1, bf16)
    inner = getattr(opt, "optimizer", opt)
    states = [v for st in inner.state.values() for k, v in st.items() if k != "step"]
    accum = getattr(opt, "gradient_accumulation_dtype", None) or getattr(opt, "grad_acc_dtype", None)
    return {
        "optimizer": type(opt).__name__,
        "module": _dtypes(p for p in engine.module.parameters() if p.requires_grad),
        "master": _dtypes(master) if master is not None else None,
        "optimizer_states": _dtypes(states),
        "grad_accum": str(accum).removeprefix("torch.") if accum is not None else None,
    }
