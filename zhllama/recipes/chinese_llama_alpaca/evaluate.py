"""Evaluation: language modelling in bits per character (comparable across tokenizers), task
metrics on the held-out instruction split, tokenizer efficiency, generation samples, and a
report a person can look at (HTML with the plots inline, PNGs beside it)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError, atomic_dir, fetch_dir, read_json, write_json
from zhllama.core.training.loss import IGNORE_INDEX, pad_rows, token_loss_sum
from zhllama.recipes.chinese_llama_alpaca import mcq, modeling
from zhllama.recipes.chinese_llama_alpaca.configs import EvalConfig
from zhllama.recipes.chinese_llama_alpaca.corpus import read_corpus
from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings, generate
from zhllama.recipes.chinese_llama_alpaca.scoring import answer_options, pad_id, rank_options
from zhllama.recipes.chinese_llama_alpaca.sft import read_alpaca

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
# The order every table and plot uses. pt_base_vocab: pretrained like pt_merged, at the same
# compute, with the base vocabulary only (the vocabulary extension's ablation).
MODEL_ROLES = ("base", "pt_base_vocab", "pt_merged", "final")


# --- language modelling -------------------------------------------------------------------------


def text_chunks(lines: Sequence[str], chunk_chars: int) -> list[str]:
    """Cut lines into pieces of at most ``chunk_chars`` characters, so every model, whatever
    its tokenizer, scores exactly the same characters within its context."""
    chunks = []
    for line in lines:
        chunks.extend(line[i : i + chunk_chars] for i in range(0, len(line), chunk_chars))
    return [c for c in chunks if c.strip()]


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
        batch = pad_rows([rows[i] for i in order[k : k + batch_size]], pad_id(tokenizer))
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
                pad_token_id=pad_id(tokenizer),
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
    options = answer_options(records, cfg.task_options, path)
    ranked = rank_options(model, tokenizer, records, options, cfg.batch_size, max_seq_length)
    predicted = ranked["predicted"]
    greedy = records[: cfg.task_greedy_max_examples] if cfg.task_greedy_max_examples else records
    prompts = [build_prompt(r["instruction"], r["input"]) for r in greedy]
    answers = greedy_answers(model, tokenizer, prompts, cfg.task_max_new_tokens, cfg.batch_size)
    exact = sum(a == r["output"].strip() for a, r in zip(answers, greedy, strict=True))
    gold_share = {o: sum(r["output"].strip() == o for r in records) / len(records) for o in options}
    return {
        "task_file": str(path),
        "examples": len(records),
        "options": options,
        "accuracy_loglik": ranked["accuracy"],
        "exact_match": exact / len(greedy),
        "greedy_examples_scored": len(greedy),
        "test_loss": ranked["gold_loss"],
        "predicted_share": {o: predicted.count(o) / len(records) for o in options},
        "gold_share": gold_share,
        "majority_share": max(gold_share.values()),  # what always answering the commonest option scores
        "greedy_examples": [
            {"instruction": r["instruction"], "input": r["input"][:80], "gold": r["output"], "greedy": a}
            for r, a in list(zip(greedy, answers, strict=True))[:8]
        ],
    }


# --- the stage ----------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalInputs:
    """What evaluation reads. Models are optional so that a partial chain can be evaluated."""

    text_file: str | os.PathLike[str]
    task_file: str | os.PathLike[str] | None = None
    base_model: str | os.PathLike[str] | None = None
    pt_base_vocab_model: str | os.PathLike[str] | None = None
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


def metric_safe(name: str) -> str:
    """A name MLflow takes as part of a metric key (letters of any script, digits, _ - . / space)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


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
        flat["task_majority_share"] = task["majority_share"]
        flat["sft_test_loss"] = task["test_loss"]
    for key in ("sft_valid_loss", "pt_valid_loss"):
        if result.get(key) is not None:
            flat[key] = result[key]
    for role, scored in result.get("mcq", {}).items():
        flat[f"{role}_mcq_accuracy"] = scored["mean_accuracy"]
        flat[f"{role}_mcq_questions"] = scored["questions"]
        for subject, entry in scored["subjects"].items():
            flat[f"{role}_mcq_accuracy.{metric_safe(subject)}"] = entry["accuracy"]
    tok = result.get("tokenizer")
    if tok:
        flat["tokens_per_zh_char_base"] = tok["base"]["tokens_per_chinese_char"]
        flat["tokens_per_zh_char_merged"] = tok["merged"]["tokens_per_chinese_char"]
    return flat


def _mcq_folder(uri: str, stack: contextlib.ExitStack) -> Path:
    """The multiple-choice folder, fetched to a temporary copy when it is a URL; checked at once
    (a bad layout fails before any model is scored)."""
    folder = Path(uri)
    if "://" in uri:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zhllama-mcq-")))
        folder = fetch_dir(uri, tmp / "mcq")
    mcq.find_subjects(folder)
    return folder


def run_evaluate(inputs: EvalInputs, out_dir: str | os.PathLike[str], cfg: EvalConfig) -> dict[str, Any]:
    """Score every given model and write ``metrics.json``, ``samples.json``, ``report.html`` and
    ``plots/*.png`` into ``out_dir`` (whole or not at all). Returns the metrics."""
    with contextlib.ExitStack() as stack:
        return _run_evaluate(inputs, out_dir, cfg, stack)


def _run_evaluate(
    inputs: EvalInputs, out_dir: str | os.PathLike[str], cfg: EvalConfig, stack: contextlib.ExitStack
) -> dict[str, Any]:
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
    mcq_dir = _mcq_folder(cfg.mcq_dir, stack) if cfg.mcq_dir else None
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
        if mcq_dir is not None:
            t0 = time.perf_counter()
            scored = mcq.score_mcq(
                model,
                tokenizer,
                mcq_dir,
                shots=cfg.mcq_shots,
                split=cfg.mcq_split,
                max_per_subject=cfg.mcq_max_per_subject,
                batch_size=cfg.batch_size,
            )
            result.setdefault("mcq", {})[role] = scored
            log.info(
                "%-9s multiple choice (%s, %d-shot): mean accuracy %.3f over %d subjects, %d questions (chance %.2f; %.1f s)",
                role,
                scored["split"],
                scored["shots"],
                scored["mean_accuracy"],
                len(scored["subjects"]),
                scored["questions"],
                mcq.CHANCE,
                time.perf_counter() - t0,
            )
        if role == "final":
            if inputs.task_file:
                result["task"] = task_metrics(model, tokenizer, inputs.task_file, cfg)
                log.info(
                    "task: accuracy %.3f (log-likelihood) on %d examples, %.3f (greedy exact match) on the first %d",
                    result["task"]["accuracy_loglik"],
                    result["task"]["examples"],
                    result["task"]["exact_match"],
                    result["task"]["greedy_examples_scored"],
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
