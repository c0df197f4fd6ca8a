"""Instruction tuning on alpaca-format data (run_clm_sft_with_peft.py): prompt tokens are
masked out of the loss, a distinct ``[PAD]`` is added, batches are grouped by length."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError, atomic_dir, write_json
from zhllama.core.training.loop import Dist, init_distributed, train
from zhllama.core.training.loss import IGNORE_INDEX, pad_rows
from zhllama.recipes.chinese_llama_alpaca import modeling
from zhllama.recipes.chinese_llama_alpaca.configs import SftConfig
from zhllama.recipes.chinese_llama_alpaca.pretrain import ADAPTER_DIR, TOKENIZER_DIR, apply_lora
from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt
from zhllama.recipes.chinese_llama_alpaca.vocab import add_pad_token

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")


def _check_record(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for field in ("instruction", "output"):
        if field not in record:
            raise InputError(f"{where}: missing field {field!r}")
    for field in FIELDS:
        if field in record and record[field] is not None and not isinstance(record[field], str):
            raise InputError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def read_alpaca(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read alpaca-format JSON (a list of objects) or JSONL (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: instruction file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: instruction file is empty")
    records: list[dict[str, str]] = []
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL (or broken JSON, reported below with its line)
    if whole is not None and not isinstance(whole, list) and not (isinstance(whole, dict) and "instruction" in whole):
        shape = f"an object with keys {sorted(whole)[:5]}" if isinstance(whole, dict) else f"a {type(whole).__name__}"
        raise InputError(f"{path}: expected a JSON list of records or JSONL (one record per line), got {shape}")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        for i, record in enumerate(data):
            records.append(_check_record(record, f"{path}: record {i}"))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno})") from None
            records.append(_check_record(record, f"{path}:{lineno}"))
    if not records:
        raise InputError(f"{path}: no instruction records")
    return records


def tokenize_example(tokenizer, record: dict[str, str], max_seq_length: int) -> tuple[list[int], list[int]]:
    """input_ids = bos + prompt + output + eos, truncated; labels -100 over bos + prompt."""
    source = tokenizer(build_prompt(record["instruction"], record["input"]), add_special_tokens=True)["input_ids"]
    target = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (source + target)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(source) + target)[:max_seq_length]
    return ids, labels


class SftSource:
    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.examples]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad input_ids with the pad id, labels with -100, attention_mask 0 over padding."""
        return pad_rows([self.examples[i] for i in indices], self.pad_id)


def text_rows(
    files: Sequence[str | os.PathLike[str]], tokenizer, count: int, tokens: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """``count`` rows of plain corpus text (bos + ``tokens`` ids, every token a target), from
    lines in a seeded order: the replay share of SFT batches."""
    import random

    from zhllama.recipes.chinese_llama_alpaca.corpus import read_corpus

    lines = read_corpus(files)
    random.Random(seed).shuffle(lines)
    rows: list[tuple[list[int], list[int]]] = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        for k in range(0, len(ids) - tokens // 2, tokens):  # no short tail rows
            row = [tokenizer.bos_token_id, *ids[k : k + tokens]]
            rows.append((row, [IGNORE_INDEX, *row[1:]]))
            if len(rows) == count:
                return rows
    if not rows:
        raise InputError(f"{', '.join(map(str, files))}: no text of {tokens // 2}+ tokens to replay")
    return rows


def build_source(path, tokenizer, max_seq_length: int, limit: int = 0) -> SftSource:
    records = read_alpaca(path)
    if limit:
        records = records[:limit]
    examples = [tokenize_example(tokenizer, r, max_seq_length) for r in records]
    examples = [e for e in examples if any(lab != IGNORE_INDEX for lab in e[1])]  # prompt filled max_seq_length
    if not examples:
        raise InputError(f"{path}: every example's prompt is longer than max_seq_length={max_seq_length}")
    return SftSource(examples, tokenizer.pad_token_id)


def closed_answer_accuracy(
    valid_file: str | os.PathLike[str], tokenizer, cfg: SftConfig
) -> Callable[[Any], dict[str, float]] | None:
    """When the validation split is a closed-answer task (a few distinct outputs, as the
    default sentiment task), a function giving the model's accuracy on it (the most likely
    option is the answer): every evaluation logs it as ``eval_accuracy``, the curve of accuracy
    against SFT steps. None for open-ended data."""
    from zhllama.recipes.chinese_llama_alpaca.scoring import closed_options, rank_options

    records = read_alpaca(valid_file)
    if cfg.max_eval_examples:
        records = records[: cfg.max_eval_examples]
    options = closed_options(records)
    if options is None:
        return None

    def accuracy(model) -> dict[str, float]:
        ranked = rank_options(model, tokenizer, records, options, cfg.per_device_eval_batch_size, cfg.max_seq_length)
        return {"eval_accuracy": ranked["accuracy"]}

    return accuracy


def training_source(
    train_file: str | os.PathLike[str], text_files: Sequence[str | os.PathLike[str]], tokenizer, cfg: SftConfig
) -> tuple[SftSource, int]:
    """The instruction examples, plus ``cfg.text_mix_share`` of rows replayed from the corpus
    (grouped by length, they form batches of their own: about that share of optimizer steps is
    plain language modelling). Returns the source and the number of replayed rows."""
    source = build_source(train_file, tokenizer, cfg.max_seq_length)
    if not cfg.text_mix_share:
        return source, 0
    if not text_files:
        raise InputError("sft.text_mix_share > 0 needs the corpus text to replay (--mix_text)")
    wanted = round(len(source) * cfg.text_mix_share / (1 - cfg.text_mix_share))
    extra = text_rows(text_files, tokenizer, wanted, cfg.text_mix_tokens, cfg.seed)
    source.examples.extend(extra)
    log.info(
        "replaying %d rows of %d corpus tokens (%.0f%% of rows)",
        len(extra),
        cfg.text_mix_tokens,
        100 * cfg.text_mix_share,
    )
    return source, len(extra)


def prepare_model(model_dir, cfg: SftConfig):
    model = modeling.load_model(model_dir)
    tokenizer = modeling.load_tokenizer(model_dir)
    modeling.check_vocab(model, tokenizer, str(model_dir))
    pad_id = add_pad_token(tokenizer)
    info = modeling.resize_embeddings(model, tokenizer, None, init="mean_of_pieces")  # [PAD]: mean of all rows
    model.config.pad_token_id = pad_id
    return model, tokenizer, info


def run_sft(
    model_dir: str | os.PathLike[str],
    train_file: str | os.PathLike[str],
    valid_file: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    cfg: SftConfig,
    resume: bool = False,
    stop_after_steps: int | None = None,
    world: Dist | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    text_files: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """SFT with LoRA from the PT-merged model; writes ``adapter/``, ``tokenizer/`` (with
    ``[PAD]``), ``train_log.json`` and ``metrics.json``. With ``cfg.text_mix_share``, rows of
    ``text_files`` (the PT corpus) join the training examples."""
    world = world or init_distributed()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer, resize_info = prepare_model(model_dir, cfg)
    train_source, replayed = training_source(train_file, text_files, tokenizer, cfg)
    eval_source = build_source(valid_file, tokenizer, cfg.max_seq_length, cfg.max_eval_examples) if valid_file else None
    log.info(
        "SFT: %d train examples, %d eval examples, pad id %d",
        len(train_source),
        len(eval_source) if eval_source else 0,
        tokenizer.pad_token_id,
    )
    model = apply_lora(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_metrics = closed_answer_accuracy(valid_file, tokenizer, cfg) if valid_file else None
    result = train(
        model,
        train_source,
        eval_source,
        cfg,
        out_dir,
        resume=resume,
        group_by_length=cfg.group_by_length,
        world=world,
        stop_after_steps=stop_after_steps,
        on_log=on_log,
        eval_metrics=eval_metrics,
    )
    metrics = {
        **result.metrics,
        "config": dataclasses.asdict(cfg),
        "resize": resize_info,
        "pad_token_id": tokenizer.pad_token_id,
        "train_examples": len(train_source) - replayed,
        "replayed_text_rows": replayed,
        "base_model": str(model_dir),
    }
    if world.is_main and result.steps >= result.metrics["total_steps"]:
        with atomic_dir(out_dir / ADAPTER_DIR) as tmp:
            model.save_pretrained(str(tmp))
        with atomic_dir(out_dir / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(str(tmp))
            modeling.copy_sp_model(tokenizer, tmp)
        write_json(out_dir / "train_log.json", result.log_history)
        write_json(out_dir / "metrics.json", metrics)
    return metrics
