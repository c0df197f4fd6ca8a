"""C-Eval / CMMLU-style multiple-choice scoring, as Chinese-LLaMA-Alpaca-2's ``scripts/ceval``
scores a base model: a k-shot prompt per subject, and the answer is the letter whose next-token
logit is highest at the answer position.

Layout (what both benchmarks ship)::

    DIR/dev/<subject>[_dev].csv        shots (the first k rows)
    DIR/val/<subject>[_val].csv        scored (C-Eval's split with answers), or
    DIR/test/<subject>[_test].csv      scored (CMMLU's)

Columns, matched without regard to case: an optional id, ``Question``, ``A``-``D``, ``Answer``
(others, such as C-Eval's ``explanation``, are ignored). ``<subject>`` is the file's stem
without the split suffix; it fills the prompt's header. Nothing of those data sets ships with
zhllama (their licences are non-commercial).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError

log = logging.getLogger(__name__)

CHOICES = ("A", "B", "C", "D")
CHANCE = 1.0 / len(CHOICES)
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER_CUE = "答案："
SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str


def format_question(item: Question, with_answer: bool) -> str:
    """``{Question}\\nA. {A}\\n...\\nD. {D}\\n答案：`` and, for a shot, ``{Answer}\\n\\n``."""
    text = item.question + "".join(
        f"\n{letter}. {option}" for letter, option in zip(CHOICES, item.options, strict=True)
    )
    text += "\n" + ANSWER_CUE
    return text + f"{item.answer}\n\n" if with_answer else text


def read_questions(path: str | os.PathLike[str]) -> list[Question]:
    """One subject's CSV; names the file (and row) on a missing column or a bad answer."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty CSV (expected columns Question,A,B,C,D,Answer)")
            columns = {name.strip().lower(): k for k, name in enumerate(header)}
            wanted = ["question", *(c.lower() for c in CHOICES), "answer"]
            missing = [name for name in wanted if name not in columns]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} (it has {', '.join(header)})")
            items = []
            for row_no, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    raise InputError(f"{path}:{row_no}: {len(row)} fields, the header has {len(header)}")
                answer = row[columns["answer"]].strip().upper()
                if answer not in CHOICES:
                    raise InputError(f"{path}:{row_no}: Answer {answer!r} is not one of {', '.join(CHOICES)}")
                options = tuple(str(row[columns[c.lower()]]).strip() for c in CHOICES)
                items.append(Question(row[columns["question"]].strip(), options, answer))  # type: ignore[arg-type]
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    return items


def _subject(path: Path, split: str) -> str:
    stem = path.stem
    return stem[: -len(split) - 1] if stem.endswith(f"_{split}") else stem


def find_subjects(
    mcq_dir: str | os.PathLike[str], split: str = "auto"
) -> tuple[str, dict[str, tuple[Path, Path | None]]]:
    """(the split scored, {subject: (scored CSV, its dev CSV or None)}). ``split`` is val, test
    or auto (val when the folder has one, else test)."""
    root = Path(mcq_dir)
    if not root.is_dir():
        raise InputError(f"{root}: multiple-choice folder not found (expected dev/ and val/ or test/ in it)")
    if split == "auto":
        split = next((s for s in SPLITS if (root / s).is_dir()), "")
        if not split:
            raise InputError(f"{root}: neither val/ nor test/ is there (the C-Eval/CMMLU layout)")
    elif split not in SPLITS:
        raise InputError(f"mcq_split must be val, test or auto, got {split!r}")
    scored = sorted((root / split).glob("*.csv"))
    if not scored:
        raise InputError(f"{root / split}: no .csv files")
    dev = {_subject(p, "dev"): p for p in sorted((root / "dev").glob("*.csv"))}
    return split, {_subject(p, split): (p, dev.get(_subject(p, split))) for p in scored}


def fit_prompt(
    subject: str, shots: Sequence[Question], item: Question, count_tokens, max_tokens: int
) -> tuple[str, int]:
    """The prompt with as many of ``shots`` as fit in ``max_tokens`` (dropped from the last);
    the item is never cut. Returns (prompt, shots used); raises ValueError when even the
    0-shot prompt is too long."""
    tail = format_question(item, with_answer=False)
    header = HEADER.format(subject=subject)
    for k in range(len(shots), -1, -1):
        prompt = header + "".join(format_question(s, with_answer=True) for s in shots[:k]) + tail
        if count_tokens(prompt) <= max_tokens:
            return prompt, k
    raise ValueError(f"the 0-shot prompt needs more than {max_tokens} tokens")


def letter_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids of each letter as the tokenizer writes it alone and after ``：``; their logits are
    added, as Chinese-LLaMA-Alpaca-2's evaluator does (the two often differ for SentencePiece)."""
    bare = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in CHOICES]
    after = [tokenizer(ANSWER_CUE[-1] + letter, add_special_tokens=False)["input_ids"][-1] for letter in CHOICES]
    return bare, after


def _context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


@torch.no_grad()
def score_mcq(
    model,
    tokenizer,
    mcq_dir: str | os.PathLike[str],
    shots: int = 5,
    split: str = "auto",
    max_per_subject: int = 0,
    batch_size: int = 8,
    max_tokens: int = 0,
) -> dict[str, Any]:
    """Per-subject and mean accuracy of ``model`` on a C-Eval/CMMLU-layout folder."""
    from tqdm.auto import tqdm

    if shots < 0:
        raise InputError(f"mcq_shots must be >= 0, got {shots}")
    split, subjects = find_subjects(mcq_dir, split)
    max_tokens = max_tokens or _context(model)
    bare, after = letter_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    rows: list[tuple[str, list[int], str]] = []  # (subject, ids, gold)
    shots_dropped = skipped = 0
    for subject, (path, dev_path) in subjects.items():
        items = read_questions(path)
        if max_per_subject:
            items = items[:max_per_subject]
        examples = read_questions(dev_path)[:shots] if (dev_path and shots) else []
        if shots and len(examples) < shots:
            log.warning("%s: %d of %d shots (dev file %s)", subject, len(examples), shots, dev_path or "missing")
        for item in items:
            try:
                prompt, used = fit_prompt(subject, examples, item, lambda t: len(encode(t)), max_tokens)
            except ValueError:
                skipped += 1
                continue
            shots_dropped += len(examples) - used
            rows.append((subject, encode(prompt), item.answer))
    if skipped:
        log.warning("%d question(s) longer than the model's %d positions even 0-shot: not scored", skipped, max_tokens)
    if not rows:
        raise InputError(f"{mcq_dir}: no question fits the model's {max_tokens} positions")
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
    predicted: list[str] = [""] * len(rows)
    letter_ids = torch.tensor([bare, after])
    for k in tqdm(range(0, len(order), batch_size), desc="mcq", mininterval=2.0):
        idx = order[k : k + batch_size]
        width = max(len(rows[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            seq = rows[i][1]
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = logits[torch.arange(len(idx)), mask.sum(dim=1) - 1].float()  # the position after 答案：
        choice = (last[:, letter_ids[0]] + last[:, letter_ids[1]]).argmax(dim=-1)
        for j, i in enumerate(idx):
            predicted[i] = CHOICES[int(choice[j])]
    per_subject: dict[str, dict[str, float]] = {}
    for (subject, _, gold), guess in zip(rows, predicted, strict=True):
        entry = per_subject.setdefault(subject, {"correct": 0, "questions": 0})
        entry["correct"] += guess == gold
        entry["questions"] += 1
    for entry in per_subject.values():
        entry["accuracy"] = entry["correct"] / entry["questions"]
    correct = sum(e["correct"] for e in per_subject.values())
    return {
        "split": split,
        "shots": shots,
        "subjects": per_subject,
        "mean_accuracy": sum(e["accuracy"] for e in per_subject.values()) / len(per_subject),
        "overall_accuracy": correct / len(rows),
        "questions": len(rows),
        "not_scored": skipped,
        "shots_dropped": shots_dropped,
        "chance": CHANCE,
        "predicted_share": {c: predicted.count(c) / len(rows) for c in CHOICES},
    }
