"""The run-config loader: unknown keys with a suggestion, wrong types, impossible values, overrides,
and the batch-arithmetic message, each naming the file and the dotted key."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from lumina_illus.config import ConfigError, TrainConfig, from_dict, load_config, save_config, to_dict
from lumina_illus.train.batching import check_batch_arithmetic, step_token_capacity

BASE = {
    "family": "lumina2",
    "run": {"name": "cfgtest", "out_dir": "runs"},
    "train": {"global_batch": 8, "micro_batch": 2, "grad_accum": 2, "max_steps": 10, "precision": "fp32"},
}


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.train.global_batch == 8 and cfg.train.zero_stage == 2
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip == 2.0
    assert cfg.run_dir == Path("runs/cfgtest")


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = write(tmp_path, {**BASE, "train": {**BASE["train"], "grad_acum": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "unknown key 'train.grad_acum'" in msg and "did you mean 'train.grad_accum'" in msg


def test_unknown_family_names_file_and_the_registered_ones(tmp_path):
    p = write(tmp_path, {**BASE, "family": "flux"})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'flux'" in msg and "registered: ['lumina2', 'sdxl']" in msg


def test_config_module_imports_no_family():
    """config.py validates each family's model section through its lazy registry (FAMILY_REGISTRY), so it
    imports neither families.py nor a model, not even inside a function: no config <-> families cycle."""
    src = (Path(__file__).resolve().parents[1] / "lumina_illus" / "config.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith(("lumina_illus.families", "lumina_illus.models"))}, imported


def test_unknown_section_suggests(tmp_path):
    p = write(tmp_path, {**BASE, "optimm": {"lr": 1e-4}})
    with pytest.raises(ConfigError, match=r"unknown key 'optimm'.*did you mean 'optim'"):
        load_config(p)


@pytest.mark.parametrize(
    "section,key,value,expect",
    [
        ("train", "micro_batch", "four", r"'train.micro_batch' = ?'four'|'train.micro_batch' must be an integer"),
        ("train", "zero_stage", 0, r"'train.zero_stage' = 0 must be one of \[1, 2, 3\]"),
        ("train", "precision", "fp16", r"'train.precision' = 'fp16' must be one of"),
        ("optim", "betas", [0.9], r"'optim.betas' must have 2 items"),
        ("ema", "enabled", "yes", r"'ema.enabled' must be true/false"),
    ],
)
def test_wrong_type_names_key(tmp_path, section, key, value, expect):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.setdefault(section, {})[key] = value
    p = write(tmp_path, data)
    with pytest.raises(ConfigError, match=expect) as e:
        load_config(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "section,key,value,expect",
    [
        ("optim", "lr", -1.0, r"invalid 'optim'.*'lr' must be > 0"),
        ("ema", "decay", 1.0, r"invalid 'ema'.*'decay' must be in \(0, 1\)"),
        ("checkpoint", "keep_last", 0, r"invalid 'checkpoint'.*'keep_last' must be >= 1"),
        ("train", "max_bad_steps", 0, r"invalid 'train'.*'max_bad_steps' must be > 0"),
        ("telemetry", "log_every", 0, r"invalid 'telemetry'.*'log_every' must be >= 1"),
        ("sampling", "every_steps", 5, r"invalid 'sampling'.*'prompts' must not be empty when every_steps > 0"),
        ("eval", "char_recall_every", 100, r"invalid 'eval'.*needs eval.characters and eval.tagger"),
    ],
)
def test_impossible_value_names_key(tmp_path, section, key, value, expect):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=expect):
        load_config(write(tmp_path, data))


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["train.max_steps=3", "optim.lr=1e-5", "optim.betas=[0.8, 0.9]", "ema.enabled=false", "run.name=x2"],
    )
    assert cfg.train.max_steps == 3 and cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.ema.enabled is False and cfg.run.name == "x2"


def test_bad_overrides(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"override 'train.max_steps' must look like key.sub=value"):
        load_config(p, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(p, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"'train.max_steps' must be an integer"):
        load_config(p, ["train.max_steps=abc"])


def test_missing_file_and_family(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="missing required key 'family'"):
        load_config(write(tmp_path, {"train": {}}))
    with pytest.raises(ConfigError, match=r"'family' = 'dit3'.*registered"):
        load_config(write(tmp_path, {**BASE, "family": "dit3"}))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.warmup_steps=5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) | {"source": ""} == to_dict(cfg) | {"source": ""}


def test_batch_arithmetic_mismatch_message_has_the_numbers(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.global_batch=768", "train.micro_batch=4", "train.grad_accum=6"])
    check_batch_arithmetic(cfg, world_size=32)  # 4 x 6 x 32 = 768
    with pytest.raises(ConfigError) as e:
        check_batch_arithmetic(cfg, world_size=16)
    msg = str(e.value)
    assert "train.global_batch=768" in msg and "train.micro_batch=4 x train.grad_accum=6 x world_size=16 = 384" in msg
    assert "use train.grad_accum=12" in msg


def test_token_capacity_only_in_token_mode(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["data.batching=tokens", "data.token_budget=4096"])
    assert step_token_capacity(cfg, world_size=4) == 4096 * 2 * 4
    cfg = load_config(write(tmp_path, BASE), ["data.batching=bucket"])
    assert step_token_capacity(cfg, world_size=4) is None


def test_section_dataclass_direct():
    t = from_dict(TrainConfig, {"global_batch": 4, "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1e6}}})
    assert t.deepspeed["zero_optimization"]["reduce_bucket_size"] == 1e6


@pytest.mark.parametrize("path", ["configs/toy_lu.yaml", "configs/lu2b_768.yaml"])
def test_shipped_configs_load(path):
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / path)
    world = 2 if "toy" in path else 32
    check_batch_arithmetic(cfg, world)
