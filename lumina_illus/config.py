"""Typed run configuration: one YAML file describes one run.

    cfg = load_config("configs/toy_lu.yaml", overrides=["train.max_steps=20"])

Every section is a dataclass with a comment on each field. Loading validates types, rejects unknown
keys and impossible values, and always names the file and the dotted key in the message. The family
section (`model:`) is validated against the config class its family declares in `families.py`, so
adding a family never touches this file. Resolved configs are saved as plain YAML, never pickles.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file is wrong; the message names the file and the key."""


class ConfigErrorOnEveryRank(ConfigError):
    """A ConfigError raised at the same point on every rank (a check of the world size, or of every rank's
    config gathered together): each rank reports it, then they leave together (train.py waits at a barrier,
    so a launcher that kills the others when one rank exits cannot cut off their messages)."""


# ---------------------------------------------------------------------------------------------
# generic dataclass <-> dict machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against annotation `tp`; returns the converted value or raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: '{key}' = {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' = {value!r} must be one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: '{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key, where): _coerce(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept it when it parses as a number
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys, wrong types and failed checks raise
    ConfigError naming `where` (the file) and the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{where}: unknown key '{prefix}{k}'{hint}; allowed keys here: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: invalid '{prefix.rstrip('.') or cls.__name__}': {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for YAML/JSON and checkpoint metadata."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ValueError('key: msg') when `cond` is false; used in __post_init__ validators."""
    if not cond:
        raise ValueError(f"'{key}' {msg}")


# ---------------------------------------------------------------------------------------------
# generic sections (family-independent). Family sections live with their family (see families.py).


@dataclass
class RunSection:
    name: str = "run"  # run name: W&B run name and folder under out_dir
    out_dir: str = "runs"  # everything this run writes lands in out_dir/name
    seed: int = 0  # global seed; per-rank and per-worker seeds derive from it


@dataclass
class CaptionConfig:
    """Options of the caption builder (lumina_illus/data/captions.py), `data.caption` in a run config."""

    keep_order: list[str] = field(default_factory=lambda: ["character", "copyright"])  # first, in order
    tag_dropout: float = 0.0  # probability of dropping each shuffled tag (kept categories never)
    caption_dropout: float = 0.1  # probability of the whole caption becoming "" (Lumina-2 recipe)
    nl_prob: float = 0.5  # natural-language caption alone (when the sample has one and tags)
    nl_and_tags_prob: float = 0.0  # tags followed by the natural-language caption
    underscores_to_spaces: bool = True  # "long_hair" -> "long hair" (short emoticon tags like "^_^" kept)
    control_tokens: bool = True  # insert the json's control tokens (annotate_colors.py)
    control_dropout: float = 0.0  # probability of dropping each control token
    separator: str = ", "

    def __post_init__(self) -> None:
        for k in ("tag_dropout", "caption_dropout", "nl_prob", "nl_and_tags_prob", "control_dropout"):
            check(0.0 <= getattr(self, k) <= 1.0, k, "must be in [0, 1]")
        check(self.nl_prob + self.nl_and_tags_prob <= 1.0, "nl_prob", "+ nl_and_tags_prob must be <= 1")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # tar paths, globs, brace patterns or "pipe:cmd"
    cached_latents: bool = False  # shards hold VAE latents (data/cache_latents.py) instead of images
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches each worker prepares ahead
    shuffle_buffer: int = 1000  # samples held for shuffling inside a worker
    batching: Literal["bucket", "tokens"] = "tokens"  # same-bucket micro-batches | token-budget packing
    token_budget: int = 16384  # image tokens per micro-batch when batching == "tokens"
    pack_lookahead: float = 2.0  # tokens mode: pack once this many budgets of samples wait (more: fuller
    # micro-batches, more decoded images held per worker; bench/packing.py measures the trade)
    patch_tokens_per_side: int = 16  # pixels per image token side (VAE 8x * patch 2)
    min_area: int = 256 * 256  # smallest bucket area in pixels
    max_area: int = 1024 * 1024  # target area of buckets; images are resized to about this
    area_step: int = 256  # area levels: squares of side sqrt(min_area)..sqrt(max_area) in this step (px);
    # an image goes to the level nearest its own area (small images are not blown up to max_area)
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 4.0  # widest/tallest bucket aspect ratio
    skip_aspect: float = 6.0  # images more elongated than this are skipped; between max_aspect and
    # this they are cropped into the most elongated bucket
    min_side: int = 64  # images smaller than this (pixels) are skipped and counted
    random_crop: bool = False  # crop position inside the bucket: random (recorded) or centred
    caption: dict[str, Any] = field(default_factory=dict)  # caption builder options (data/captions.py)
    read_retries: int = 3  # a shard read that fails (missing file, I/O error, pipe command) is retried
    retry_backoff_s: float = 1.0  # this many seconds before the first retry, doubling for each next one
    max_skip_fraction: float = 0.01  # more bad samples than this share of the last skip_window samples
    # (data errors and samples lost with shards; bucket_leftover excluded) stops the run with a checkpoint
    skip_window: int = 10000  # samples (delivered + skipped, all ranks) the skip fraction is taken over

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.read_retries >= 0, "read_retries", "must be >= 0")
        check(self.retry_backoff_s >= 0, "retry_backoff_s", "must be >= 0")
        check(0.0 <= self.max_skip_fraction <= 1.0, "max_skip_fraction", "must be in [0, 1] (1 never stops)")
        check(self.skip_window >= 1, "skip_window", "must be >= 1")
        check(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.token_budget > 0, "token_budget", "must be > 0")
        check(self.pack_lookahead >= 1.0, "pack_lookahead", "must be >= 1 (budgets of pending samples)")
        check(self.patch_tokens_per_side > 0, "patch_tokens_per_side", "must be > 0")
        check(0 < self.min_area <= self.max_area, "min_area", "must be > 0 and <= max_area")
        check(self.area_step > 0, "area_step", "must be > 0")
        check(self.bucket_step > 0 and self.bucket_step % 8 == 0, "bucket_step", "must be a positive multiple of 8")
        check(
            self.bucket_step % self.patch_tokens_per_side == 0,
            "bucket_step",
            f"must be a multiple of patch_tokens_per_side ({self.patch_tokens_per_side})",
        )
        check(self.min_area >= self.bucket_step**2, "min_area", f"must be >= bucket_step^2 ({self.bucket_step**2})")
        check(self.max_aspect >= 1.0, "max_aspect", "must be >= 1")
        check(self.skip_aspect >= self.max_aspect, "skip_aspect", "must be >= max_aspect")
        check(self.min_side >= 1, "min_side", "must be >= 1")
        max_tokens = self.max_area // self.patch_tokens_per_side**2
        check(
            self.batching != "tokens" or self.token_budget >= max_tokens,
            "token_budget",
            f"must hold one image of max_area ({max_tokens} tokens)",
        )
        try:
            from_dict(CaptionConfig, self.caption, where="caption", prefix="caption.")
        except ConfigError as e:
            raise ValueError(str(e)) from None


@dataclass
class OptimConfig:
    lr: float = 2e-4  # Lumina-2 recipe
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 2.0  # max global grad norm; 0 disables
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    text_encoder_lr: float | None = None  # own LR for trainable text encoders (None: frozen encoders)

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")


def normalize_checkpointing(spec: bool | float | str) -> bool | float | str:
    """An activation checkpointing setting -> False (off), True (every block), a fraction in (0, 1) of
    the blocks, or "every_K" (K >= 2: blocks 0, K, 2K, ... as torchtitan's selective layer option).
    Accepted: true/false, "off"/"full", a number in [0, 1] (0 off, 1 full), "every_K" (K >= 1)."""
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, (int, float)):
        if not 0 <= spec <= 1:
            raise ValueError(f"'activation_checkpointing' = {spec} must be in [0, 1] as a fraction of the blocks")
        return float(spec) if 0 < spec < 1 else bool(spec)
    if spec in ("off", "full"):
        return spec == "full"
    m = re.fullmatch(r"every_([0-9]+)", str(spec))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"'activation_checkpointing' = {spec!r} must be true/false, 'off', 'full', a fraction "
                         "in [0, 1] or 'every_K' (K >= 1)")
    return True if int(m.group(1)) == 1 else f"every_{int(m.group(1))}"


def checkpointed_blocks(spec: bool | float | str, n_blocks: int) -> list[bool]:
    """Which of `n_blocks` blocks (in forward order) recompute in backward under `spec`
    (see normalize_checkpointing); a fraction f picks floor(f * n_blocks) blocks, evenly spread."""
    spec = normalize_checkpointing(spec)
    if isinstance(spec, bool):
        return [spec] * n_blocks
    if isinstance(spec, float):
        return [math.floor((i + 1) * spec + 1e-9) > math.floor(i * spec + 1e-9) for i in range(n_blocks)]
    k = int(spec.removeprefix("every_"))
    return [i % k == 0 for i in range(n_blocks)]


@dataclass
class TrainConfig:
    global_batch: int = 768  # samples per optimizer step over all ranks
    micro_batch: int = 4  # samples per rank per forward (bucket mode) / upper bound (token mode)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps to run
    # DeepSpeed ZeRO stage; >= 1 because the ZeRO optimizers are what skip non-finite-gradient steps
    zero_stage: Literal[1, 2, 3] = 2
    precision: Literal["bf16", "fp32"] = "bf16"  # fp32 for CPU toy runs
    # recompute block activations in backward (read by the family): false/"off", true/"full", a fraction
    # in (0, 1) of the blocks, evenly spread, or "every_K" (blocks 0, K, 2K, ...); see checkpointed_blocks
    activation_checkpointing: bool | float | str = False
    max_bad_steps: int = 20  # consecutive NaN/inf steps before the run stops (with a checkpoint)
    # seconds a collective may wait for the other ranks before it fails (passed to init_process_group);
    # the ranks still alive then stop with the dead or stuck ones named (train/cluster.py)
    collective_timeout_s: float = 1800.0
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the derived DeepSpeed JSON

    def __post_init__(self) -> None:
        for k in ("global_batch", "micro_batch", "grad_accum", "max_steps", "max_bad_steps", "collective_timeout_s"):
            check(getattr(self, k) > 0, k, "must be > 0")
        self.activation_checkpointing = normalize_checkpointing(self.activation_checkpointing)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    update_every: int = 1  # optimizer steps between EMA updates
    start_step: int = 0

    def __post_init__(self) -> None:
        check(0.0 < self.decay < 1.0, "decay", "must be in (0, 1)")
        check(self.update_every >= 1, "update_every", "must be >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # save resume state every N steps (0: never by steps)
    every_minutes: float = 60.0  # and every M minutes (0: never by time)
    keep_last: int = 3  # resume states kept on disk
    export_every_steps: int = 0  # consolidated safetensors export every N steps (0: at checkpoints)
    export_layouts: list[str] = field(default_factory=lambda: ["original", "diffusers", "comfy"])
    export_ema: bool = True  # export the EMA weights too (when EMA is on)
    export_dtype: Literal["bf16", "fp32"] = "bf16"  # dtype of the consolidated safetensors export
    resume: str = "auto"  # "auto" (latest in run dir), "none", or a checkpoint path

    def __post_init__(self) -> None:
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.every_steps >= 0, "every_steps", "must be >= 0")
        check(self.every_minutes >= 0, "every_minutes", "must be >= 0")
        check(self.export_every_steps >= 0, "export_every_steps", "must be >= 0")


@dataclass
class TelemetryConfig:
    wandb_project: str = "lumina_illus"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    log_every: int = 1  # steps between log lines
    peak_tflops: float | None = None  # device bf16 peak for MFU; None: detected (H100 SXM: 989)
    # debug: a data_keys event per step with every rank's sample keys (one extra gather of strings per step)
    log_sample_keys: bool = False

    def __post_init__(self) -> None:
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")


@dataclass
class SampleGridConfig:
    every_steps: int = 0  # sample grid every N steps (0: off)
    prompts: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])  # (width, height)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 4.0

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", "must be >= 0")
        check(self.every_steps == 0 or bool(self.prompts), "prompts", "must not be empty when every_steps > 0")
        check(bool(self.sizes) and bool(self.seeds), "sizes", "and seeds must not be empty")
        check(all(w > 0 and h > 0 for w, h in self.sizes), "sizes", "must be positive (width, height) pairs")
        check(self.steps >= 1, "steps", "must be >= 1")


@dataclass
class EvalConfig:
    char_recall_every: int = 0  # run a small char_recall every N steps (0: off)
    characters: str | None = None  # characters file (see eval/char_recall.py)
    tagger: str | None = None  # WD-format tagger dir (model.onnx + selected_tags.csv)
    max_characters: int = 8  # characters evaluated in the in-training recall

    def __post_init__(self) -> None:
        check(self.char_recall_every >= 0, "char_recall_every", "must be >= 0")
        check(self.char_recall_every == 0 or (self.characters is not None and self.tagger is not None),
              "char_recall_every", "> 0 needs eval.characters and eval.tagger")
        check(self.max_characters >= 1, "max_characters", "must be >= 1")


@dataclass
class ValidationConfig:
    """Deterministic held-out loss (lumina_illus/train/validation.py): fixed samples, fixed t values and
    fixed noise per sample, so one checkpoint always gives the same numbers on any world size."""

    shards: list[str] = field(default_factory=list)  # held-out shards (never in data.shards: checked at start)
    every_steps: int = 0  # evaluate every N optimizer steps (0: off; eval/val_loss.py works on exports)
    samples: int = 0  # first N samples of the shards in order (0: all); needs their manifest.json
    t_values: list[float] = field(default_factory=lambda: [(i + 0.5) / 10 for i in range(10)])  # Lumina t
    seed: int = 0  # noise seed (with each sample's key)
    micro_batch: int = 10  # (sample, t) pairs per forward

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", "must be >= 0")
        check(self.every_steps == 0 or bool(self.shards), "shards", "must name held-out shards when every_steps > 0")
        check(self.samples >= 0, "samples", "must be >= 0")
        check(bool(self.t_values) and all(0.0 <= t <= 1.0 for t in self.t_values), "t_values",
              "must be a non-empty list of t in [0, 1] (0 = noise, 1 = data)")
        check(self.micro_batch >= 1, "micro_batch", "must be >= 1")


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the family's trainable network (Lumina-2: the NextDiT, SDXL: the UNet);
    the base weights freeze and stay out of the optimizer (lumina_illus/models/lora.py)."""

    enabled: bool = False
    rank: int = 16  # r: inner width of every adapter
    alpha: float = 16.0  # the update is (alpha / rank) * up @ down, the scale ComfyUI and kohya apply
    dropout: float = 0.0  # dropout on the adapter's input (peft lora_dropout)
    # fnmatch patterns over module names of the network (e.g. "layers.*.attention.qkv"); the Linear
    # layers any pattern matches get an adapter; empty: the family's default (attention + FFN)
    targets: list[str] = field(default_factory=list)
    init: Literal["default", "gaussian"] = "default"  # peft init_lora_weights: up = 0 (kaiming down) | gaussian down
    # training timesteps of a LoRA run: None keeps the objective's own; "uniform" | "logit_normal" replaces it
    # (SDXL: objective.timestep_sampling, Lumina-2: objective.timestep), the seed's low-SNR idea for v-pred LoRA
    timestep_sampling: str | None = None
    formats: list[str] = field(default_factory=lambda: ["comfy", "peft"])  # LoRA files written at each export
    export_merged: bool = False  # also write the full merged weights (base + LoRA) in checkpoint.export_layouts

    def __post_init__(self) -> None:
        check(self.rank >= 1, "rank", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(self.timestep_sampling in (None, "uniform", "logit_normal"), "timestep_sampling",
              "must be null, 'uniform' or 'logit_normal'")
        unknown = sorted(set(self.formats) - {"comfy", "peft"})
        check(not unknown, "formats", f"unknown formats {unknown} (comfy, peft)")
        check(bool(self.formats) or self.export_merged, "formats", "must name a format unless export_merged is true")


@dataclass
class RunConfig:
    family: str  # "lumina2" | "sdxl" (families.py)
    model: Any  # the family's own config dataclass (validated by the family's config class)
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    sampling: SampleGridConfig = field(default_factory=SampleGridConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    source: str = "<config>"  # the file this config came from (set by load_config)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------------------------------------
# loading


def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: override '{dotted}': '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None, where: str) -> dict:
    """Apply `key.sub=value` strings (value parsed as YAML) to a raw config dict."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"{where}: override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        _set_dotted(raw, k.strip(), yaml.safe_load(v), f"{where} (override {ov!r})")
    return raw


# The family registry: name -> "module:attribute" of its Family object (lumina_illus/families.py,
# get_family). A new family is one folder plus one line here. The modules are imported lazily, so a
# family's heavy dependencies load only when it is used, and this module imports no family (no cycle).
FAMILY_REGISTRY: dict[str, str] = {
    "lumina2": "lumina_illus.models.lumina2:FAMILY",
    "sdxl": "lumina_illus.models.sdxl:FAMILY",
}


def load_family(name: str) -> Any:
    """The registered Family object `name` (KeyError naming the registered ones)."""
    if name not in FAMILY_REGISTRY:
        raise KeyError(f"unknown family {name!r}; registered: {sorted(FAMILY_REGISTRY)}")
    module, attr = FAMILY_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def config_from_raw(raw: dict, where: str = "<config>") -> RunConfig:
    """Validate a raw dict (already YAML-parsed) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    raw = dict(raw)
    raw.pop("source", None)
    if "family" not in raw:
        raise ConfigError(f"{where}: missing required key 'family' (one of the registered families)")
    try:
        fam = load_family(raw["family"])
    except KeyError as e:
        raise ConfigError(f"{where}: 'family' = {raw['family']!r}: {e.args[0]}") from None
    model = from_dict(fam.config_cls, raw.get("model") or {}, where=where, prefix="model.")
    raw["model"] = model
    cfg = from_dict(RunConfig, raw, where=where)
    cfg.source = where
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate one YAML run config."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    raw = apply_overrides(raw, overrides, where)
    return config_from_raw(raw, where)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as plain YAML (what a run really used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
