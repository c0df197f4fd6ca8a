"""Stage configurations: one dataclass per stage, every field documented and checked.

The CLI options, the YAML presets and (later) the pipeline parameters are all derived from
these dataclasses, so a knob is declared once. An unknown key is an error, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from zhllama.io import InputError

T = TypeVar("T")


def doc(help_text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds the CLI and the docs."""
    return dataclasses.field(metadata={"help": help_text}, **kwargs)


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be > 0, got {value!r}")


@dataclasses.dataclass
class VocabConfig:
    """Train a Chinese SentencePiece model and merge it into a base LLaMA tokenizer."""

    vocab_size: int = doc("Pieces in the Chinese SentencePiece model (the recipe: 20000; its spm_train example: 4000).", default=8000)
    model_type: str = doc("SentencePiece model type: bpe (the recipe's) or unigram.", default="bpe")
    character_coverage: float = doc("Share of characters covered by the model (the recipe's 0.9995).", default=0.9995)
    input_sentence_size: int = doc("Sentences sampled from the corpus for training (big corpora); 0 = all.", default=2_000_000)
    shuffle_input_sentence: bool = doc("Shuffle before sampling input_sentence_size sentences.", default=True)
    max_sentence_length: int = doc("Bytes; longer lines are skipped by the trainer, not fatal.", default=16384)
    num_threads: int = doc("Trainer threads.", default=2)
    byte_fallback: bool = doc("Byte fallback in the Chinese model (the merged model keeps the base's).", default=False)
    normalization_rule_name: str = doc("Normaliser of the Chinese model; 'identity' matches LLaMA's, so merged pieces match raw text.", default="identity")
    split_digits: bool = doc("Split numbers into single digits, as LLaMA does.", default=True)
    new_piece_score: str = doc(
        "Score of appended pieces: 'descending' continues the base's order so the SentencePiece "
        "and Hugging Face fast tokenizers agree; 'zero' is the recipe's literal choice.",
        default="descending",
    )
    seed: int = doc("Seed for sentence sampling.", default=42)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "num_threads", "max_sentence_length")
        if self.model_type not in {"bpe", "unigram"}:
            raise ValueError(f"VocabConfig.model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"VocabConfig.character_coverage must be in [0.9, 1.0], got {self.character_coverage}")
        if self.input_sentence_size < 0:
            raise ValueError("VocabConfig.input_sentence_size must be >= 0 (0 = all sentences)")
        if self.new_piece_score not in {"descending", "zero"}:
            raise ValueError(f"VocabConfig.new_piece_score must be 'descending' or 'zero', got {self.new_piece_score!r}")


def _base_type(tp: Any) -> Any:
    """int | None -> int; leaves plain types alone."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field`` option per dataclass field (default None: 'not given')."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (see zhllama/config.py)")
    for field in dataclasses.fields(cls):
        tp = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if tp is bool:
            conv: Any = _parse_bool
        elif typing.get_origin(tp) is list:
            conv = _parse_list
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


def build_config(cls: type[T], preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then the preset YAML's section for this stage, then explicit overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        values.update(load_preset(preset, cls))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


PRESET_SECTIONS = {"VocabConfig": "vocab"}


def load_preset(path: str | Path, cls: type) -> dict[str, Any]:
    """Read the section of a preset YAML that belongs to ``cls`` (e.g. ``vocab:``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: preset not found") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a preset must be a mapping of stage name -> settings")
    unknown_sections = sorted(set(data) - set(PRESET_SECTIONS.values()))
    if unknown_sections:
        raise InputError(f"{path}: unknown section(s) {unknown_sections}; known: {sorted(PRESET_SECTIONS.values())}")
    section = data.get(PRESET_SECTIONS[cls.__name__], {}) or {}
    if not isinstance(section, dict):
        raise InputError(f"{path}: section {PRESET_SECTIONS[cls.__name__]!r} must be a mapping")
    return section
