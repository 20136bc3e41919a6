"""Settings, written once: the dataclasses below are the single source of every option.

``TrainConfig`` holds what the trainer needs; each model has its own config dataclass (models/).
The CLI's flags are generated from these fields (name, type, help, choices), recipes are small
named overrides of them, and each dataclass validates itself with one clear error per field.
"""

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from ..data import KINDS, LAYOUTS
from ..device import DEVICE_TYPES, DTYPES
from ..models import MODELS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes; reduce-overhead: CUDA graphs
# The loop keeps every step's loss and clock time for the whole run, allocated when training starts
# (12 bytes a step): the bound stops a stray zero (--max-steps 10000000000) from taking 120 GB.
MAX_STEPS = 10_000_000
INT64 = 2**63  # ints end up as tensor sizes, indices and seeds: int64 in torch


def option(default, help: str, choices=None, type=None):
    """A setting: its default, its help, and where the field's annotation is not the flag's type
    (``float | None``) that type."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **({"type": type} if type else {})}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # data
    data: str = option("names", "a registered data set (names, tinyshakespeare) or a path to a UTF-8 text file")
    kind: str = option(
        "auto", "lines: one item per line; stream: one text; auto: the data set's (lines for a path)", KINDS
    )
    layout: str = option(
        "windows",
        "windows: one target per row (the lecture's batches); sequences: every position of an item or text window",
        LAYOUTS,
    )
    seq_len: int = option(64, "stream data, sequences layout: targets per training row")
    model: str = option("wavenet", "the model", tuple(MODELS))
    # optimisation
    optimizer: str = option(
        "sgd", "sgd: the lecture's p -= lr * grad; adamw: decoupled weight decay on matrices only", OPTIMIZERS
    )
    lr: float = option(0.1, "peak learning rate")
    min_lr: float | None = option(
        None, "step schedule: the rate after the decay; cosine: the floor it decays to (unset: --lr / 10)", type=float
    )
    schedule: str = option(
        "step",
        "step: lr, then min_lr from --decay-at on; cosine: linear warm-up, then cosine decay to min_lr",
        SCHEDULES,
    )
    decay_at: float = option(0.75, "step schedule: the fraction of the run after which min_lr applies")
    warmup: float = option(0.0, "cosine schedule: the fraction of the run spent warming up")
    weight_decay: float = option(0.0, "adamw: weight decay of the matrices")
    beta1: float = option(0.9, "adamw: beta1")
    beta2: float = option(0.99, "adamw: beta2")
    grad_clip: float = option(0.0, "clip the gradient's global norm to this (0: no clipping)")
    batch_size: int = option(
        32, "rows per micro-batch, per process (under torchrun the global batch is processes x this)"
    )
    grad_accum: int = option(1, "micro-batches per optimiser step")
    max_steps: int = option(200_000, "optimiser steps")
    max_seconds: float = option(
        0.0, "stop training after this many seconds (0: no limit); the schedule then follows time"
    )
    # evaluation, logging, checkpoints
    eval_interval: int = option(
        0,
        "estimate train/val loss every this many steps "
        "and keep the best val estimate's weights in best.pt (0: no estimates)",
    )
    eval_iters: int = option(20, "random batches per estimate")
    patience: int = option(0, "stop after this many estimates in a row without a better val estimate (0: never)")
    eval_max_tokens: int = option(
        500_000, "the final evaluation covers each split exhaustively up to this many targets, an even subset above"
    )
    log_interval: int = option(1000, "log the training loss every this many steps")
    checkpoint_interval: int = option(10_000, "save a checkpoint every this many steps")
    checkpoint_seconds: float = option(
        300.0, "also save one when this many seconds of wall clock passed since the last: the most a crash can lose"
    )
    # system
    seed: int = option(42, "seed of the split, the initialisation and the batches")
    device: str = option(
        "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps (under torchrun, cuda is cuda:LOCAL_RANK)"
    )
    dtype: str = option(
        "auto",
        "bfloat16: autocast matmuls to bfloat16, float32 master weights; "
        "auto: bfloat16 where the device multiplies it natively",
        DTYPES,
    )
    compile: bool = option(False, "torch.compile the model (falls back to eager with a message where it cannot)")
    compile_mode: str = option(
        "default", "with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)", COMPILE_MODES
    )
    dist_timeout: float = option(300.0, "under torchrun: seconds a rank waits for the others before ending the job")

    def __post_init__(self):
        check_numbers(self)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is None:  # the lecture's ratio
            self.min_lr = self.lr / 10
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "eval_iters",
            "eval_max_tokens",
            "log_interval",
            "checkpoint_interval",
        ):
            _at_least(self, name, 1)
        for name in (
            "max_steps",
            "max_seconds",
            "eval_interval",
            "patience",
            "weight_decay",
            "grad_clip",
            "min_lr",
            "checkpoint_seconds",
        ):
            _at_least(self, name, 0)
        for name in ("decay_at", "warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{flag(name)} must be in [0, 1], got {getattr(self, name)}")
        for name in ("beta1", "beta2"):  # AdamW divides by 1 - beta ** step: 1 is a division by zero
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.max_steps > MAX_STEPS:
            raise ValueError(
                f"--max-steps must be <= {MAX_STEPS:,} (the run keeps each step's loss in memory), "
                f"got {self.max_steps:,}; bound a long run with --max-seconds instead"
            )
        if not 0 <= self.seed < INT64 - 1:  # seed + 1 seeds the estimates' generator
            raise ValueError(f"--seed must be in [0, 2^63 - 1), got {self.seed}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0, got {self.dist_timeout}")
        if self.patience and not self.eval_interval:
            raise ValueError(f"--patience {self.patience} counts val estimates: set --eval-interval too")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"--compile-mode {self.compile_mode} applies to --compile: add --compile")
        try:
            device_type = "auto" if self.device == "auto" else torch.device(self.device).type
        except (RuntimeError, TypeError):
            device_type = None
        if device_type not in ("auto", *DEVICE_TYPES):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


def _at_least(config, name: str, low) -> None:
    if not getattr(config, name) >= low:  # written so that nan fails too
        raise ValueError(f"{flag(name)} must be >= {low}, got {getattr(config, name)}")


def check_numbers(config) -> None:
    """Every int field of a config within int64 and every float field finite, or one error naming the flag.

    For every config dataclass, before its own range checks: nan passes comparisons such as
    ``value < 0`` unnoticed, inf makes a run that looks fine and learns nothing, and torch reports an
    int beyond int64 as a many-line C++ error far from the flag that caused it.
    """
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not -INT64 <= value < INT64:
            raise ValueError(f"{flag(f.name)} must be below 2^63 in magnitude, got {value}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_fields() -> dict[str, dataclasses.Field]:
    """Every model config's fields but vocab_size, by name (a field shared by several models is one flag)."""
    found: dict[str, dataclasses.Field] = {}
    for _, config_cls in MODELS.values():
        for f in fields(config_cls):
            if f.name != "vocab_size":
                if f.name in found and found[f.name].type is not f.type:
                    raise TypeError(
                        f"model option {f.name!r} has two types ({found[f.name].type}, {f.type}): "
                        "one flag cannot serve both"
                    )
                found.setdefault(f.name, f)
    return found


def model_help(name: str) -> str:
    """The help of a model flag, from every model that takes it: "mlp, wavenet: embedding width; gated: ..."."""
    meanings: dict[str, list[str]] = {}
    for model, (_, config_cls) in MODELS.items():
        for f in fields(config_cls):
            if f.name == name:
                meanings.setdefault(f.metadata.get("help", ""), []).append(model)
    return "; ".join(f"{', '.join(models)}: {text}" for text, models in meanings.items())


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split flat ``name: value`` settings into TrainConfig's and the models' (None: not given)."""
    train_names = {f.name for f in fields(TrainConfig)}
    model_names = set(model_fields())
    unknown = set(overrides) - train_names - model_names
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(flag(n) for n in unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return {k: v for k, v in given.items() if k in train_names}, {k: v for k, v in given.items() if k in model_names}


def make_configs(settings: dict, vocab_size: int | None = None):
    """(TrainConfig, the model's config) from flat settings; model options the model does not have are an error."""
    train_settings, model_settings = split_overrides(settings)
    config = TrainConfig(**train_settings)
    config_cls = MODELS[config.model][1]
    own = {f.name for f in fields(config_cls)}
    foreign = set(model_settings) - own
    if foreign:
        raise ValueError(f"the {config.model} model has no {', '.join(sorted(flag(n) for n in foreign))}")
    if vocab_size is not None:
        model_settings["vocab_size"] = vocab_size
    model_config = config_cls(**model_settings)
    check_numbers(model_config)
    return config, model_config


def check_new_run(config: TrainConfig, model_config) -> None:
    """Combinations that would train silently wrong, refused before a new run starts.

    Not part of make_configs: checkpoints written before these checks existed must still load.
    """
    if MODELS[config.model][0].batch_statistics:
        # BatchNorm's variance over a single value is nan (0 with the fused kernel: a run that learns nothing).
        if config.layout == "windows" and config.batch_size < 2:
            raise ValueError(
                f"--batch-size must be >= 2 for the {config.model} model with --layout windows: its BatchNorm "
                f"normalises over the batch, and one window has no variance (got {config.batch_size})"
            )
        if (
            config.layout == "sequences" and config.batch_size * config.seq_len < 2
        ):  # stream rows; a line has 2 targets or more
            raise ValueError(
                f"--batch-size x --seq-len must be >= 2 for the {config.model} model: its BatchNorm normalises over "
                f"the batch's targets, and one has no variance (got {config.batch_size} x {config.seq_len})"
            )
    if config.optimizer == "adamw" and config.lr * config.weight_decay >= 1:
        raise ValueError(
            f"--weight-decay x --lr must be < 1 (AdamW scales the matrices by 1 - lr x weight_decay each step; "
            f"got {config.weight_decay:g} x {config.lr:g}): lower --weight-decay"
        )
    if config.min_lr > config.lr:
        raise ValueError(
            f"--min-lr ({config.min_lr:g}) must be <= --lr ({config.lr:g}): the schedule decays from --lr to --min-lr; "
            "lower --min-lr as well"
        )
