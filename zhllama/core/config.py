"""Config helpers every recipe uses: documented dataclass fields, CLI options derived from them,
presets read by section, and the training and registry settings the platform core itself reads.

A knob is declared once, as a dataclass field; the CLI, the presets and the pipeline parameters
are derived from the fields. An unknown key is an error, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from zhllama.core.io import InputError

T = TypeVar("T")


def doc(help_text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds the CLI and the docs."""
    return dataclasses.field(metadata={"help": help_text}, **kwargs)


def positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be > 0, got {value!r}")


def base_type(tp: Any) -> Any:
    """int | None -> int; leaves plain types alone."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_bool(text: str | bool) -> bool:
    """The one reading of a true/false word (CLI flags, ``--param`` values)."""
    if isinstance(text, bool):
        return text
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field`` option per dataclass field (default None: 'not given')."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} ({cls.__module__})")
    for field in dataclasses.fields(cls):
        tp = base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if tp is bool:
            conv: Any = parse_bool
        elif typing.get_origin(tp) is list:
            conv = parse_list
        elif tp in (int, float, str):
            conv = tp
        else:
            conv = str
        group.add_argument(
            f"--{field.name}",
            type=conv,
            default=None,
            metavar=tp.__name__.upper() if isinstance(tp, type) else "LIST",
            help=f"{field.metadata.get('help', '')} (default: {default!r})",
        )


def read_preset(path: str | Path, sections: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A preset YAML as ``{section: settings}``; a section not in ``sections`` is an error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: preset not found") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a preset must be a mapping of stage name -> settings")
    known = sorted(sections)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}; known: {known}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise InputError(f"{path}: section {name!r} must be a mapping")
    return {name: dict(section or {}) for name, section in data.items()}


def build_config(cls: type[T], section: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then a preset's section for this config, then explicit overrides (None: not given)."""
    values: dict[str, Any] = dict(section or {})
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def config_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) per dataclass field, ``int | None`` read as ``int``, ``list[str]`` as ``list``."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        tp = base_type(hints[field.name])
        fields.append((field.name, list if typing.get_origin(tp) is list else tp, default))
    return fields


@dataclasses.dataclass
class TrainArgs:
    """Optimisation settings the training loop reads (zhllama/core/training/loop.py)."""

    learning_rate: float = doc("Peak learning rate (recipe: 2e-4 PT, 1e-4 SFT).", default=2e-4)
    weight_decay: float = doc("AdamW weight decay.", default=0.01)
    warmup_ratio: float = doc("Share of steps with linear warm-up before the cosine decay.", default=0.05)
    max_grad_norm: float = doc("Gradient clipping norm; 0 = off.", default=1.0)
    per_device_train_batch_size: int = doc("Sequences per device per micro-batch.", default=4)
    per_device_eval_batch_size: int = doc("Sequences per device per eval batch.", default=8)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", default=1)
    max_steps: int = doc("Optimizer steps; 0 = run num_train_epochs.", default=100)
    num_train_epochs: float = doc("Epochs, when max_steps is 0.", default=1.0)
    seed: int = doc("Seed for init, data order and dropout.", default=42)
    logging_steps: int = doc("Log the loss every N steps.", default=10)
    eval_steps: int = doc("Evaluate every N steps (and at the end); 0 = only at the end.", default=50)
    save_steps: int = doc("Checkpoint every N steps; 0 = never.", default=50)
    save_total_limit: int = doc("Checkpoints kept (oldest deleted).", default=2)
    precision: str = doc(
        "fp32; bf16 autocast (GPU, preferred there: no fp16 overflow NaN; also CPUs with AVX512-BF16/AMX, faster "
        "matmuls, see benchmarks/RESULTS.md); auto (bf16 where the device has bf16 matmuls, else fp32: on a CPU "
        "without them bf16 is emulated and slower); or fp16 (GPU only, loss scaling).",
        default="fp32",
    )
    gradient_checkpointing: bool = doc(
        "Recompute activations to save memory (GPU, long blocks); slower, off on CPU.", default=False
    )
    num_threads: int = doc("CPU threads for torch; 0 = all cores.", default=0)

    def __post_init__(self) -> None:
        positive(
            self,
            "learning_rate",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        )
        for name in (
            "weight_decay",
            "max_grad_norm",
            "max_steps",
            "eval_steps",
            "save_steps",
            "num_threads",
            "save_total_limit",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise ValueError(f"{type(self).__name__}: set max_steps > 0 or num_train_epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{type(self).__name__}.warmup_ratio must be in [0, 1)")
        if self.precision not in {"fp32", "bf16", "fp16", "auto"}:
            raise ValueError(
                f"{type(self).__name__}.precision must be fp32, bf16, fp16 or auto, got {self.precision!r}"
            )

    def learning_rate_for(self, parameter_name: str) -> float:
        """The peak learning rate of one parameter (by its name in the model); a recipe's
        settings may give some parameters their own."""
        return self.learning_rate


FLOOR_OPERATORS = (">=", "<=")


def parse_floor_threshold(spec: str) -> tuple[str, str, float]:
    """``name>=0.6`` or ``name<=2.5`` -> (name, operator, value)."""
    for op in FLOOR_OPERATORS:
        name, sep, value = spec.partition(op)
        if sep:
            try:
                return name.strip(), op, float(value)
            except ValueError:
                break
    raise ValueError(f"floor threshold {spec!r}: expected NAME>=NUMBER or NAME<=NUMBER")


def parse_promotion_metric(spec: str) -> tuple[str, str]:
    """``name:max`` or ``name:min`` -> (name, direction)."""
    name, _, direction = spec.partition(":")
    direction = direction or "max"
    if not name or direction not in {"max", "min"}:
        raise ValueError(f"promotion metric {spec!r}: expected NAME:max or NAME:min")
    return name, direction


@dataclasses.dataclass
class RegisterConfig:
    """Registration in the MLflow model registry and the promotion gate."""

    model_name: str = doc("Registered model name.", default="zhllama-chinese-alpaca")
    promotion_metrics: list[str] = doc(
        "Evaluation metrics the challenger must not lose on, NAME:min or NAME:max; it must win on at least one.",
        # The task's own held-out loss first: bits/char on general text falls as SFT specialises the
        # model, and accuracy near chance is noise.
        default_factory=lambda: ["sft_test_loss:min", "task_accuracy_loglik:max"],
    )
    min_improvement: float = doc("Smallest gain that counts as a win on a metric (absolute).", default=0.0)
    max_regression: float = doc(
        "Largest loss on a metric that still passes the gate (absolute: nats, or accuracy share).", default=0.01
    )
    floor: bool = doc(
        "Apply the floor below (floor_thresholds, floor_margin_over_majority) before any comparison; off only for "
        "machinery checks on models not meant to learn (configs/tiny.yaml).",
        default=True,
    )
    floor_thresholds: list[str] = doc(
        "Absolute thresholds a version must pass to take champion, the first one too (NAME>=X or NAME<=X on "
        "the evaluation summary; checked with mlflow.validate_evaluation_results); else it stays challenger.",
        default_factory=lambda: ["task_accuracy_loglik>=0.6"],
    )
    floor_margin_over_majority: float = doc(
        "task_accuracy_loglik must beat task_majority_share (the accuracy of always giving the test split's "
        "commonest answer) by at least this to take champion; 0 = merely beat it.",
        default=0.1,
    )
    lock_timeout: float = doc(
        "Seconds a promotion lock may stay unchanged before it counts as stale (its holder died) and is "
        "broken; a registration gives up after twice this.",
        default=120.0,
    )
    smoke_test: bool = doc(
        "Champion moves only after the challenger's server, started from the registry, has answered the smoke "
        "prompts (the serve_smoke step); off: champion moves as soon as the gate passes.",
        default=True,
    )

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("RegisterConfig.model_name must not be empty")
        if not self.promotion_metrics:
            raise ValueError("RegisterConfig.promotion_metrics must name at least one metric")
        for spec in self.promotion_metrics:
            parse_promotion_metric(spec)
        for spec in self.floor_thresholds:
            name, op, _ = parse_floor_threshold(spec)
            if name == "task_accuracy_loglik" and op != ">=":
                raise ValueError(f"floor threshold {spec!r}: accuracy is bounded from below (>=), higher is better")
        if self.min_improvement < 0 or self.max_regression < 0 or self.floor_margin_over_majority < 0:
            raise ValueError(
                "RegisterConfig.min_improvement, max_regression and floor_margin_over_majority must be >= 0"
            )
        positive(self, "lock_timeout")


@dataclasses.dataclass
class SmokeConfig:
    """Deploy-then-promote: a challenger the gate lets win is served from the registry and
    answers the smoke prompts before ``champion`` moves to it."""

    task_items: int = doc("Task test items sent besides the evaluation's sample prompts.", default=3)
    max_new_tokens: int = doc("Tokens generated per smoke answer.", default=16)
    answer_timeout: float = doc("Seconds each answer may take (the request included).", default=60.0)
    start_timeout: float = doc("Seconds the server may take to download, load and answer /ping.", default=600.0)

    def __post_init__(self) -> None:
        positive(self, "max_new_tokens", "answer_timeout", "start_timeout")
        if self.task_items < 0:
            raise ValueError(f"SmokeConfig.task_items must be >= 0, got {self.task_items}")
