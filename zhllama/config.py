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
from zhllama.prompts import SENTIMENT_INSTRUCTION

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

    vocab_size: int = doc("Pieces in the Chinese SentencePiece model (the recipe's chinese_sp.model: 20000).", default=20000)
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


PRESET_SECTIONS = {
    "VocabConfig": "vocab",
    "BaseModelConfig": "base",
    "PretrainConfig": "pretrain",
    "SftConfig": "sft",
    "MergeConfig": "merge",
    "EvalConfig": "evaluate",
    "RegisterConfig": "register",
}


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


@dataclasses.dataclass
class BaseModelConfig:
    """The embedded default base: a small random-init LLaMA, so the pipeline runs offline on 2 cores."""

    hidden_size: int = doc("Hidden size (the target benchmark model: 256).", default=256)
    intermediate_size: int = doc("MLP size.", default=688)
    num_hidden_layers: int = doc("Decoder layers.", default=4)
    num_attention_heads: int = doc("Attention heads.", default=4)
    max_position_embeddings: int = doc("Longest sequence.", default=1024)
    tie_word_embeddings: bool = doc("LLaMA unties them.", default=False)
    seed: int = doc("Init seed.", default=42)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BaseModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("BaseModelConfig.hidden_size must be a multiple of num_attention_heads")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_MODULES_TO_SAVE = ["embed_tokens", "lm_head"]


@dataclasses.dataclass
class TrainArgs:
    """Optimisation and LoRA settings shared by pretraining and SFT (the recipe's run_*.sh flags)."""

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
    precision: str = doc("fp32; bf16 autocast (GPU, preferred there: no fp16 overflow NaN; also CPUs with AVX512-BF16/AMX, ~2x faster matmuls); or fp16 (GPU only, loss scaling).", default="fp32")
    gradient_checkpointing: bool = doc("Recompute activations to save memory (GPU, long blocks); slower, off on CPU.", default=False)
    num_threads: int = doc("CPU threads for torch; 0 = all cores.", default=0)
    lora_rank: int = doc("LoRA rank r.", default=8)
    lora_alpha: float = doc("LoRA alpha (scaling alpha/r).", default=32.0)
    lora_dropout: float = doc("LoRA dropout.", default=0.05)
    lora_target_modules: list[str] = doc("Modules that get LoRA adapters.", default_factory=lambda: list(LORA_TARGETS))
    modules_to_save: list[str] = doc("Modules trained in full and saved with the adapter.", default_factory=lambda: list(LORA_MODULES_TO_SAVE))

    def __post_init__(self) -> None:
        _positive(self, "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                  "gradient_accumulation_steps", "lora_rank", "lora_alpha", "logging_steps")
        for name in ("weight_decay", "max_grad_norm", "max_steps", "eval_steps", "save_steps", "num_threads", "save_total_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise ValueError(f"{type(self).__name__}: set max_steps > 0 or num_train_epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{type(self).__name__}.warmup_ratio must be in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{type(self).__name__}.lora_dropout must be in [0, 1)")
        if self.precision not in {"fp32", "bf16", "fp16"}:
            raise ValueError(f"{type(self).__name__}.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not self.lora_target_modules:
            raise ValueError(f"{type(self).__name__}.lora_target_modules must name at least one module")


@dataclasses.dataclass
class PretrainConfig(TrainArgs):
    """Continued pretraining on plain Chinese text (run_clm_pt_with_peft.py)."""

    stage: int = doc("1: train only the embeddings (all else frozen); 2: LoRA + full embed_tokens/lm_head.", default=2)
    block_size: int = doc("Tokens per training block (texts are concatenated and cut into blocks).", default=512)
    validation_split_percentage: float = doc("Percent of blocks held out for evaluation.", default=1.0)
    init_new_embeddings: str = doc("New rows: mean_of_pieces (mean of the base pieces the token splits into), mean (mean of all old rows, what transformers' resize gives) or default (the library's random init).", default="mean_of_pieces")
    max_eval_blocks: int = doc("Cap on evaluation blocks (0 = all).", default=64)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"PretrainConfig.stage must be 1 or 2, got {self.stage}")
        _positive(self, "block_size")
        if not 0 <= self.validation_split_percentage < 50:
            raise ValueError("PretrainConfig.validation_split_percentage must be in [0, 50)")
        if self.init_new_embeddings not in {"mean_of_pieces", "mean", "default"}:
            raise ValueError("PretrainConfig.init_new_embeddings must be mean_of_pieces, mean or default")


@dataclasses.dataclass
class SftConfig(TrainArgs):
    """Instruction tuning on alpaca-format data (run_clm_sft_with_peft.py)."""

    learning_rate: float = doc("Peak learning rate (recipe SFT: 1e-4).", default=1e-4)
    weight_decay: float = doc("AdamW weight decay (recipe SFT: 0).", default=0.0)
    warmup_ratio: float = doc("Warm-up share (recipe SFT: 0.03).", default=0.03)
    max_seq_length: int = doc("Prompt + response tokens; longer examples are truncated.", default=512)
    group_by_length: bool = doc("Batch examples of similar length, so little compute goes to padding.", default=True)
    max_eval_examples: int = doc("Cap on validation examples per evaluation (0 = all).", default=200)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "max_seq_length")


@dataclasses.dataclass
class MergeConfig:
    """Merge LoRA adapters into the base weights."""

    low_memory: bool = doc("Merge one safetensors shard at a time (peak ~ largest shard + adapter, not 2x the model).", default=False)
    max_shard_size: str = doc("Shard size of the written model.", default="2GB")


SAMPLE_PROMPTS = [
    "请用一句话介绍北京。",
    "中国的首都是哪里？",
    "写一句关于春天的诗。",
    f"{SENTIMENT_INSTRUCTION}\n质量很好，非常满意，下次还会再买。",
    f"{SENTIMENT_INSTRUCTION}\n物流太慢了，包装也破了，很失望。",
]


@dataclasses.dataclass
class EvalConfig:
    """Evaluation: bits per character on held-out text, task metrics, generation samples."""

    lm_max_lines: int = doc("Held-out text lines scored per model (0 = all).", default=200)
    lm_chunk_chars: int = doc("Characters per scored sequence; every model scores exactly the same characters.", default=256)
    batch_size: int = doc("Sequences per forward pass.", default=8)
    task_max_examples: int = doc("Instruction test examples scored (0 = all).", default=200)
    task_options: list[str] = doc("Answer options scored by log-likelihood; empty = the distinct outputs of the test file (at most 20).", default_factory=list)
    task_max_new_tokens: int = doc("Greedy tokens generated for exact match.", default=8)
    sample_prompts: list[str] = doc("Prompts for the generation samples (instruction, then an optional input after a newline).", default_factory=lambda: list(SAMPLE_PROMPTS))
    max_new_tokens: int = doc("Tokens generated per sample (the recipe's settings otherwise).", default=64)
    seed: int = doc("Sampling seed.", default=0)
    num_threads: int = doc("CPU threads for torch; 0 = all cores.", default=0)

    def __post_init__(self) -> None:
        _positive(self, "lm_chunk_chars", "batch_size", "task_max_new_tokens", "max_new_tokens")
        for name in ("lm_max_lines", "task_max_examples", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")


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
        # model, and accuracy near chance is noise (measured: a 5-step SFT "won" on both).
        default_factory=lambda: ["sft_test_loss:min", "task_accuracy_loglik:max"],
    )
    min_improvement: float = doc("Smallest gain that counts as a win on a metric (absolute).", default=0.0)
    max_regression: float = doc("Largest loss on a metric that still passes the gate (absolute: nats, or accuracy share).", default=0.01)
    lock_timeout: float = doc("Seconds to wait for another registration's promotion lock (and its age after which it is stale).", default=120.0)

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("RegisterConfig.model_name must not be empty")
        if not self.promotion_metrics:
            raise ValueError("RegisterConfig.promotion_metrics must name at least one metric")
        for spec in self.promotion_metrics:
            parse_promotion_metric(spec)
        if self.min_improvement < 0 or self.max_regression < 0:
            raise ValueError("RegisterConfig.min_improvement and max_regression must be >= 0")
        _positive(self, "lock_timeout")
