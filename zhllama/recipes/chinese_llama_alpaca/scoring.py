"""Closed-answer scoring: each option's log-likelihood as the response to a prompt, the best
option the prediction. SFT logs it on the validation split at every evaluation (the accuracy
curve); evaluation reports it on the held-out test split."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from zhllama.core.io import InputError
from zhllama.core.training.loss import IGNORE_INDEX, pad_rows, plain_output_head
from zhllama.recipes.chinese_llama_alpaca.sft import tokenize_example

MAX_INFERRED_OPTIONS = 20


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.unk_token_id or 0)


def closed_options(records: list[dict[str, str]]) -> list[str] | None:
    """The records' distinct outputs when they are a closed-answer task (at most
    MAX_INFERRED_OPTIONS of them), else None."""
    options = sorted({r["output"].strip() for r in records})
    return options if len(options) <= MAX_INFERRED_OPTIONS else None


def answer_options(
    records: list[dict[str, str]], configured: Sequence[str], where: str | os.PathLike[str]
) -> list[str]:
    """The configured options, else the records' distinct outputs (a closed-answer task has few)."""
    if configured:
        return list(configured)
    options = closed_options(records)
    if options is None:
        distinct = len({r["output"].strip() for r in records})
        raise InputError(
            f"{where}: {distinct} distinct outputs; set evaluate.task_options to score a closed-answer task"
        )
    return options


@torch.no_grad()
def sequence_logprobs(
    model, rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int
) -> list[tuple[float, int]]:
    """Sum of log p(label tokens) and their count, per row. For LLaMA-family models the output
    layer runs only where a label is (a closed answer is a few tokens after a long prompt, so
    the [batch, length, vocab] logits would be almost all waste); others go through their logits."""
    model.eval()
    head = plain_output_head(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = pad_rows([rows[i] for i in idx], pad)
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if head is None:
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                .logits[:, :-1]
                .float()
            )
            picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = (picked * mask).sum(dim=1)
        else:
            hidden = model.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1]
            logits = head(hidden[mask]).float()
            picked = torch.log_softmax(logits, dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
            sums = torch.zeros(len(idx), dtype=picked.dtype).index_add_(0, mask.nonzero()[:, 0], picked)
        for j, i in enumerate(idx):
            out[i] = (float(sums[j]), int(mask[j].sum()))
    return out


def rank_options(
    model, tokenizer, records: list[dict[str, str]], options: Sequence[str], batch_size: int, max_seq_length: int
) -> dict[str, Any]:
    """Accuracy of the most likely option, the predictions, and the mean loss per token of the
    gold answers."""
    rows, owners = [], []
    for n, record in enumerate(records):
        for option in options:
            rows.append(tokenize_example(tokenizer, {**record, "output": option}, max_seq_length))
            owners.append(n)
    scores = sequence_logprobs(model, rows, pad_id(tokenizer), batch_size)
    best: dict[int, tuple[float, str]] = {}
    gold_nll, gold_tokens = 0.0, 0
    for (logp, count), n, option in zip(scores, owners, list(options) * len(records), strict=True):
        if n not in best or logp > best[n][0]:
            best[n] = (logp, option)
        if option == records[n]["output"].strip():
            gold_nll -= logp
            gold_tokens += count
    predicted = [best[n][1] for n in range(len(records))]
    correct = sum(p == r["output"].strip() for p, r in zip(predicted, records, strict=True))
    return {
        "accuracy": correct / len(records),
        "predicted": predicted,
        "gold_loss": gold_nll / max(gold_tokens, 1),
    }
