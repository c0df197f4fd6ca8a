"""The inputs every benchmark shares, built once under a work directory: the default data, the
default base model (hidden 256, 4 layers), the 20K vocabulary merged into it, and the model SFT
starts from (the base resized to the merged vocabulary, as the PT merge leaves it)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from zhllama.core.settings import PROJECT_ROOT

log = logging.getLogger("zhllama.bench")


@dataclass
class Workspace:
    root: Path
    data: Path
    base: Path
    vocab: Path
    sft_model: Path
    vocab_metrics: dict

    @property
    def tokenizer(self) -> Path:
        return self.vocab / "tokenizer"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


def prepare(root: Path) -> Workspace:
    from zhllama.recipes.chinese_llama_alpaca import modeling, pretrain
    from zhllama.recipes.chinese_llama_alpaca.build_data import build_default_data
    from zhllama.recipes.chinese_llama_alpaca.configs import BaseModelConfig, PretrainConfig, VocabConfig
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer, run_vocab

    root.mkdir(parents=True, exist_ok=True)
    data = PROJECT_ROOT / "data"
    if not (data / "corpus" / "train.txt").is_file():
        data = root / "data"
        if not (data / "corpus" / "train.txt").is_file():
            log.info("building the default data under %s", data)
            build_default_data(data)
    base = root / "base"
    if not (base / "config.json").is_file():
        modeling.create_base_model(base, resolve_base_tokenizer(), BaseModelConfig())
    vocab = root / "vocab"
    if not (vocab / "metrics.json").is_file():
        started = time.perf_counter()
        run_vocab([data / "corpus" / "train.txt"], [data / "corpus" / "valid.txt"], vocab, VocabConfig())
        log.info("vocabulary stage: %.1f s", time.perf_counter() - started)
    sft_model = root / "sft_model"
    if not (sft_model / "config.json").is_file():
        model, tokenizer, _ = pretrain.prepare_model(base, vocab / "tokenizer", PretrainConfig())
        modeling.save_model(model, tokenizer, sft_model)
    return Workspace(
        root=root,
        data=data,
        base=base,
        vocab=vocab,
        sft_model=sft_model,
        vocab_metrics=json.loads((vocab / "metrics.json").read_text()),
    )
