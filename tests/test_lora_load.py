"""A Lumina-2 LoRA run's checkpoint folder loads for sampling/eval: the trainer's own export of a LoRA run
(Checkpointer.save over the family's export: kohya file + peft folder, EMA in ema/, meta.json, no full
NextDiT weights) given to load_generator gives the run's base model with the adapters merged in; its
NextDiT computes what the live model with those adapters computes (the EMA ones when ema/ is there, the
raw ones otherwise), which differs from the base alone. SDXL's counterpart is in test_lora.py."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import torch
from test_lora import nextdit_inputs
from test_lora_train import _pretrained_base
from test_train_checkpoint import one_rank_group  # noqa: F401 (autouse: Checkpointer is collective)

from lumina_illus.config import load_config
from lumina_illus.families import get_family
from lumina_illus.models.checkpoint_io import load_nextdit
from lumina_illus.models.lora import KOHYA_FILE, PEFT_DIR
from lumina_illus.train.checkpoint import Checkpointer, TrainState
from lumina_illus.train.ema import ShardedEMA

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _adapters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if ".lora_" in n}


def _set_random(adapters: dict[str, torch.nn.Parameter], seed: int) -> None:
    """Trained-looking adapters (lora_B starts at zero, which would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_lumina_lora_only_checkpoint_loads_as_its_base_with_the_adapters(world, tmp_path):
    fam = get_family("lumina2")
    base_dir = _pretrained_base(tmp_path / "base")
    cfg = load_config(world, ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", f"model.pretrained={base_dir}",
                              "checkpoint.export_dtype=fp32", f"run.out_dir={tmp_path / 'runs'}"])  # fmt: skip
    parts = fam.build_training(cfg, CPU)
    dit = parts.module.dit.eval()
    adapters = _adapters(parts.module)
    assert adapters
    _set_random(adapters, seed=1)
    ema = ShardedEMA(parts.module, cfg.ema, 0, 1)  # the EMA holds these adapters ...
    ema_adapters = {n: p.detach().clone() for n, p in adapters.items()}
    _set_random(adapters, seed=2)  # ... the raw weights trained on
    raw_adapters = {n: p.detach().clone() for n, p in adapters.items()}

    engine = SimpleNamespace(module=parts.module, zero_optimization_partition_weights=lambda: False)
    step = Checkpointer(cfg, 0, 1, {}).save(engine, TrainState(step=3), resume_state=False, export=True,
                                            parts=parts, ema=ema, loader=None, generators={})  # fmt: skip
    assert sorted(p.name for p in step.iterdir()) == ["ema", KOHYA_FILE, PEFT_DIR, "meta.json"]
    assert (step / "ema" / KOHYA_FILE).is_file()

    x, t, cap, mask = nextdit_inputs(dit.config)

    def live_with(values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for n, p in adapters.items():
                p.copy_(values[n])
            return dit(x, t, cap, mask)

    with torch.no_grad():
        base_out = load_nextdit(base_dir).eval()(x, t, cap, mask)
    for expected, label in ((live_with(ema_adapters), "ema"), (live_with(raw_adapters), "raw")):
        if label == "raw":  # a LoRA run without EMA export: the raw adapters at the top of the folder
            shutil.rmtree(step / "ema")
        gen = fam.load_generator(step, CPU)
        assert not _adapters(gen.model)  # merged into plain Linear layers
        with torch.no_grad():
            loaded = gen.model(x, t, cap, mask)
        for a, b, base in zip(loaded, expected, base_out):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{label}: {m}")  # noqa: B023
            assert (a - base).abs().max() > 1e-3, label  # the adapters do something
