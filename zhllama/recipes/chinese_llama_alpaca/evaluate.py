"""Evaluation: language modelling in bits per character (comparable across tokenizers), task
metrics on the held-out instruction split, tokenizer efficiency, generation samples, and a
report a person can look at (HTML with the plots inline, PNGs beside it)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError, atomic_dir, read_json, write_json
from zhllama.core.training.loss import IGNORE_INDEX, pad_rows, token_loss_sum
from zhllama.recipes.chinese_llama_alpaca import modeling
from zhllama.recipes.chinese_llama_alpaca.configs import EvalConfig
from zhllama.recipes.chinese_llama_alpaca.corpus import read_corpus
from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings, generate
from zhllama.recipes.chinese_llama_alpaca.sft import read_alpaca, tokenize_example

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
MAX_INFERRED_OPTIONS = 20
MODEL_ROLES = ("base", "pt_merged", "final")  # the order every table and plot uses


# --- language modelling -------------------------------------------------------------------------


def text_chunks(lines: Sequence[str], chunk_chars: int) -> list[str]:
    """Cut lines into pieces of at most ``chunk_chars`` characters, so every model, whatever
    its tokenizer, scores exactly the same characters within its context."""
    chunks = []
    for line in lines:
        chunks.extend(line[i : i + chunk_chars] for i in range(0, len(line), chunk_chars))
    return [c for c in chunks if c.strip()]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.unk_token_id or 0)


@torch.no_grad()
def language_model_scores(model, tokenizer, chunks: Sequence[str], batch_size: int) -> dict[str, float]:
    """Total negative log-likelihood of ``chunks`` (each scored from bos), in bits per character,
    bits per UTF-8 byte, and per-token perplexity with the model's own tokenizer."""
    model.eval()
    rows = []
    for chunk in chunks:
        ids = [tokenizer.bos_token_id] + tokenizer(chunk, add_special_tokens=False)["input_ids"]
        rows.append((ids, [IGNORE_INDEX] + ids[1:]))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(len(ids) for ids, _ in rows) > limit:
        raise InputError(
            f"a {max(len(i) for i, _ in rows)}-token chunk exceeds the model's {limit} positions: lower lm_chunk_chars"
        )
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths: little padding
    nll = 0.0
    tokens = 0
    for k in range(0, len(order), batch_size):
        batch = pad_rows([rows[i] for i in order[k : k + batch_size]], _pad_id(tokenizer))
        loss, count = token_loss_sum(model, batch)
        nll += float(loss)
        tokens += count
    chars = sum(len(c) for c in chunks)
    nbytes = sum(len(c.encode("utf-8")) for c in chunks)
    return {
        "bits_per_char": nll / LN2 / chars,
        "bits_per_byte": nll / LN2 / nbytes,
        "token_perplexity": math.exp(min(nll / max(tokens, 1), 50.0)),
        "tokens_per_char": tokens / chars,
        "tokens": tokens,
        "chars": chars,
        "bytes": nbytes,
    }


# --- task metrics -------------------------------------------------------------------------------


def _options(records: list[dict[str, str]], configured: Sequence[str], path: Path) -> list[str]:
    if configured:
        return list(configured)
    options = sorted({r["output"].strip() for r in records})
    if len(options) > MAX_INFERRED_OPTIONS:
        raise InputError(
            f"{path}: {len(options)} distinct outputs; set evaluate.task_options to score a closed-answer task"
        )
    return options


@torch.no_grad()
def sequence_logprobs(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """Sum of log p(label tokens) and their count, per row."""
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = pad_rows([rows[i] for i in idx], pad_id)
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            .logits[:, :-1]
            .float()
        )
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * mask).sum(dim=1)
        for j, i in enumerate(idx):
            out[i] = (float(sums[j]), int(mask[j].sum()))
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding; the text after the prompt, stripped."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for k in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[k : k + batch_size], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=_pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def task_metrics(
    model, tokenizer, task_file: str | os.PathLike[str], cfg: EvalConfig, max_seq_length: int = 512
) -> dict[str, Any]:
    """Closed-answer accuracy: options ranked by log-likelihood, and greedy exact match; the mean
    loss of the gold answers is the test loss (as SFT's validation loss, on the test split)."""
    from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt

    path = Path(task_file)
    records = read_alpaca(path)
    if cfg.task_max_examples:
        records = records[: cfg.task_max_examples]
    options = _options(records, cfg.task_options, path)
    rows, owners = [], []
    for n, record in enumerate(records):
        for option in options:
            rows.append(tokenize_example(tokenizer, {**record, "output": option}, max_seq_length))
            owners.append(n)
    scores = sequence_logprobs(model, rows, _pad_id(tokenizer), cfg.batch_size)
    best: dict[int, tuple[float, str]] = {}
    gold_nll, gold_tokens = 0.0, 0
    for (logp, count), n, option in zip(scores, owners, options * len(records), strict=True):
        if n not in best or logp > best[n][0]:
            best[n] = (logp, option)
        if option == records[n]["output"].strip():
            gold_nll -= logp
            gold_tokens += count
    loglik_correct = sum(best[n][1] == r["output"].strip() for n, r in enumerate(records))
    prompts = [build_prompt(r["instruction"], r["input"]) for r in records]
    answers = greedy_answers(model, tokenizer, prompts, cfg.task_max_new_tokens, cfg.batch_size)
    exact = sum(a == r["output"].strip() for a, r in zip(answers, records, strict=True))
    predicted = [best[n][1] for n in range(len(records))]
    return {
        "task_file": str(path),
        "examples": len(records),
        "options": options,
        "accuracy_loglik": loglik_correct / len(records),
        "exact_match": exact / len(records),
        "test_loss": gold_nll / max(gold_tokens, 1),
        "predicted_share": {o: predicted.count(o) / len(records) for o in options},
        "gold_share": {o: sum(r["output"].strip() == o for r in records) / len(records) for o in options},
        "greedy_examples": [
            {"input": r["input"][:80], "gold": r["output"], "greedy": a}
            for r, a in list(zip(records, answers, strict=False))[:8]
        ],
    }


# --- the stage ----------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalInputs:
    """What evaluation reads. Models are optional so that a partial chain can be evaluated."""

    text_file: str | os.PathLike[str]
    task_file: str | os.PathLike[str] | None = None
    base_model: str | os.PathLike[str] | None = None
    pt_merged_model: str | os.PathLike[str] | None = None
    final_model: str | os.PathLike[str] | None = None
    vocab_dir: str | os.PathLike[str] | None = None
    pt_run: str | os.PathLike[str] | None = None
    sft_run: str | os.PathLike[str] | None = None

    def models(self) -> dict[str, Path]:
        found = {role: Path(getattr(self, f"{role}_model")) for role in MODEL_ROLES if getattr(self, f"{role}_model")}
        if not found:
            raise InputError("evaluate: give at least one model (base, pt_merged or final)")
        return found


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The flat figures that MLflow logs and the promotion gate compares."""
    flat: dict[str, float] = {}
    for role, scores in result["language_model"].items():
        for key in ("bits_per_char", "bits_per_byte", "token_perplexity", "tokens_per_char"):
            flat[f"{role}_{key}"] = scores[key]
    task = result.get("task")
    if task:
        flat["task_accuracy_loglik"] = task["accuracy_loglik"]
        flat["task_exact_match"] = task["exact_match"]
        flat["sft_test_loss"] = task["test_loss"]
    for key in ("sft_valid_loss", "pt_valid_loss"):
        if result.get(key) is not None:
            flat[key] = result[key]
    tok = result.get("tokenizer")
    if tok:
        flat["tokens_per_zh_char_base"] = tok["base"]["tokens_per_chinese_char"]
        flat["tokens_per_zh_char_merged"] = tok["merged"]["tokens_per_chinese_char"]
    return flat


def run_evaluate(inputs: EvalInputs, out_dir: str | os.PathLike[str], cfg: EvalConfig) -> dict[str, Any]:
    """Score every given model and write ``metrics.json``, ``samples.json``, ``report.html`` and
    ``plots/*.png`` into ``out_dir`` (whole or not at all). Returns the metrics."""
    from zhllama.recipes.chinese_llama_alpaca import report

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    started = time.perf_counter()
    models = inputs.models()
    for path in models.values():
        modeling.check_model_dir(path)
    lines = read_corpus([inputs.text_file])  # names the file on empty or non-UTF-8 input
    if cfg.lm_max_lines:
        lines = lines[: cfg.lm_max_lines]
    chunks = text_chunks(lines, cfg.lm_chunk_chars)
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "text_file": str(inputs.text_file),
        "text_lines": len(lines),
        "language_model": {},
        "models": {k: str(v) for k, v in models.items()},
    }
    samples: list[dict[str, str]] = []
    for role, path in models.items():
        t0 = time.perf_counter()
        model, tokenizer = modeling.load_model(path), modeling.load_tokenizer(path)
        modeling.check_vocab(model, tokenizer, str(path))
        scores = language_model_scores(model, tokenizer, chunks, cfg.batch_size)
        result["language_model"][role] = scores
        log.info(
            "%-9s %.3f bits/char, %.3f bits/byte, token perplexity %.1f (%.1f s)",
            role,
            scores["bits_per_char"],
            scores["bits_per_byte"],
            scores["token_perplexity"],
            time.perf_counter() - t0,
        )
        if role == "final":
            if inputs.task_file:
                result["task"] = task_metrics(model, tokenizer, inputs.task_file, cfg)
                log.info(
                    "task: accuracy %.3f (log-likelihood), %.3f (greedy exact match) on %d examples",
                    result["task"]["accuracy_loglik"],
                    result["task"]["exact_match"],
                    result["task"]["examples"],
                )
            settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            for prompt in cfg.sample_prompts:
                instruction, _, input_text = prompt.partition("\n")
                samples.append(
                    {
                        "instruction": instruction,
                        "input": input_text,
                        "response": generate(model, tokenizer, instruction, input_text, settings),
                    }
                )
        del model
    if inputs.vocab_dir:
        vocab = read_json(Path(inputs.vocab_dir) / "metrics.json")
        result["tokenizer"] = {
            k: vocab[k] for k in ("base", "merged", "base_vocab_size", "merged_vocab_size", "pieces_added")
        }
    logs = {}
    for stage, run in (("pretrain", inputs.pt_run), ("sft", inputs.sft_run)):
        if run:
            logs[stage] = read_json(Path(run) / "train_log.json")
            evals = [h["eval_loss"] for h in logs[stage] if "eval_loss" in h]
            result[f"{'pt' if stage == 'pretrain' else 'sft'}_valid_loss"] = evals[-1] if evals else None
    result["samples"] = samples
    result["eval_seconds"] = time.perf_counter() - started
    result["summary"] = summary_metrics(result)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", result)
        write_json(tmp / "samples.json", samples)
        report.write_report(tmp, result, logs)
    log.info("evaluation written to %s (%.1f s)", out_dir, result["eval_seconds"])
    return result
