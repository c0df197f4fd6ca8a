"""Continued pretraining with the merged vocabulary (run_clm_pt_with_peft.py, made resumable
and exact). Stage 1 trains only the embeddings; stage 2 trains LoRA plus full
embed_tokens/lm_head (``modules_to_save``)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError, atomic_dir, sha256_file, write_json
from zhllama.core.token_shards import TokenBlocks, check_shards, read_shard_dirs, shard_corpus
from zhllama.core.training.dropout import use_fast_lora_dropout
from zhllama.core.training.loop import Dist, init_distributed, train
from zhllama.core.training.lora_fused import use_fused_lora
from zhllama.recipes.chinese_llama_alpaca import modeling
from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig, TrainArgs

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
STAGE1_MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZHLLAMA_CACHE_DIR", Path.home() / ".cache" / "zhllama"))


class BlockSource:
    """Fixed-length blocks of token ids read from the token shards; every token is a target."""

    def __init__(self, blocks: TokenBlocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def lengths(self) -> list[int]:
        return [self.blocks.block_size] * len(self)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks.read(indices))
        return {"input_ids": ids, "labels": ids.clone()}


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike[str]) -> str:
    files = sorted(
        p
        for p in Path(tokenizer_dir).iterdir()
        if p.name in {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()


def load_blocks(
    files: Sequence[str | os.PathLike[str]],
    tokenizer,
    tokenizer_dir,
    block_size: int,
    cache_dir: Path | None = None,
    workers: int = 0,
) -> tuple[TokenBlocks, dict[str, Any]]:
    """Blocks of ``block_size`` cut from the corpus files' token shards (zhllama/core/token_shards.py:
    one per file, tokenized in ``workers`` processes in bounded memory, cached under a key of
    the file's and the tokenizer's *contents*, never their names), read by index on demand.
    Documents are ``bos ids eos``; the files are concatenated in order and the tail dropped."""
    cache_dir = cache_dir or default_cache_dir()
    vocab_size = len(tokenizer)
    shards, info = shard_corpus(
        files,
        tokenizer_dir,
        tokenizer_fingerprint(tokenizer_dir),
        vocab_size,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        cache_dir,
        workers,
    )
    check_shards(shards, vocab_size)
    blocks = TokenBlocks(shards, block_size)
    log.info(
        "%d token shard(s), %d tokens (%s, %s), %d blocks of %d",
        len(shards),
        info["tokens"],
        info["dtype"],
        "cached" if info["cache"] == "hit" else f"{info['shards_built']} tokenized",
        len(blocks),
        block_size,
    )
    return blocks, info


def split_blocks(blocks: TokenBlocks, percent: float, seed: int, max_eval: int) -> tuple[TokenBlocks, TokenBlocks]:
    """Held-out blocks, a function of the seed and the block count (so of the shard set)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(blocks), generator=gen).numpy()
    n_eval = int(len(blocks) * percent / 100)
    if percent > 0:
        n_eval = max(1, n_eval)
    if max_eval:
        n_eval = min(n_eval, max_eval)
    if n_eval >= len(blocks):
        raise InputError(
            f"{len(blocks)} blocks cannot spare {n_eval} for evaluation: add text or lower validation_split_percentage"
        )
    return blocks.select(perm[n_eval:]), blocks.select(perm[:n_eval])


def ties_embeddings(model) -> bool:
    """True when embed_tokens and lm_head are one tensor (tie_word_embeddings)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(cfg: TrainArgs, tied: bool = False):
    from peft import LoraConfig

    saved = set(cfg.modules_to_save)
    # With tied embeddings, peft trains separate copies of embed_tokens and lm_head unless
    # told to keep the tie; tests/unit/chinese_llama_alpaca/test_tied.py shows both ways.
    extra = (
        {"ensure_weight_tying": True}
        if tied and {"embed_tokens", "lm_head"} <= saved and cfg.tied_embeddings == "keep"
        else {}
    )
    return LoraConfig(
        **extra,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
        bias="none",
    )


def apply_lora(model, cfg: TrainArgs):
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.lora_target_modules) - present)
    if missing:
        raise InputError(
            f"lora_target_modules {missing} are not modules of this model (it has e.g. {sorted(present)[:12]})"
        )
    tied = ties_embeddings(model)
    if tied and cfg.tied_embeddings == "untie" and {"embed_tokens", "lm_head"} <= set(cfg.modules_to_save):
        log.info("tied embeddings: training separate embed_tokens and lm_head copies (tied_embeddings=untie)")
    model = get_peft_model(model, lora_config(cfg, tied=tied))
    use_fast_lora_dropout(model)
    use_fused_lora(model)  # after the swap: its masks are FastDropout's
    return model


def freeze_all_but_embeddings(model, new_rows_from: int | None = None) -> list[str]:
    """Stage 1: only embed_tokens (and lm_head when untied) train. With ``new_rows_from``,
    only their rows from that id on: a gradient mask zeroes the base rows' gradients, and the
    parameters are marked for no weight decay, so AdamW leaves the base rows bit-identical."""
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad = id(param) in matrices
        if param.requires_grad:
            names.append(name)
    if new_rows_from is not None:
        for weight in matrices.values():
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
            mask[new_rows_from:] = 1
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
            weight.zhllama_no_weight_decay = True
    return names


def prepare_model(base_model_dir, tokenizer_dir, cfg: PretrainConfig):
    """Load base + merged tokenizer, check they fit, resize with the chosen init."""
    model = modeling.load_model(base_model_dir)
    tokenizer = modeling.load_tokenizer(tokenizer_dir)
    base_tokenizer = modeling.load_tokenizer(base_model_dir)
    modeling.check_vocab(model, base_tokenizer, f"{base_model_dir}")
    modeling.check_vocab(model, tokenizer, f"{tokenizer_dir} vs {base_model_dir}", allow_grow=True)
    info = modeling.resize_embeddings(model, tokenizer, base_tokenizer, init=cfg.init_new_embeddings)
    return model, tokenizer, info


def run_pretrain(
    base_model_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str],
    train_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: PretrainConfig,
    resume: bool = False,
    cache_dir: Path | None = None,
    stop_after_steps: int | None = None,
    world: Dist | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    shard_dirs: Sequence[str | os.PathLike[str]] = (),
    durable_uri: str = "",
) -> dict[str, Any]:
    """Pretrain on ``train_files``, or on the token shards in ``shard_dirs`` (the pipeline's
    tokenize fan-out; then ``train_files`` is not read); ``durable_uri``: checkpoints mirrored
    there and resumed from (loop.train); writes ``adapter/`` (stage 2) or ``model/`` (stage 1), ``tokenizer/``,
    ``train_log.json`` and ``metrics.json`` (last, so its presence means the run finished)."""
    world = world or init_distributed()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer, resize_info = prepare_model(base_model_dir, tokenizer_dir, cfg)
    if shard_dirs:
        shards = read_shard_dirs(shard_dirs, len(tokenizer))
        blocks = TokenBlocks(shards, cfg.block_size)
        cache_info = {
            "cache": "shards",
            "shards": len(shards),
            "tokens": int(blocks.starts[-1]),
            "dtype": shards[0].dtype,
        }
    else:
        blocks, cache_info = load_blocks(train_files, tokenizer, tokenizer_dir, cfg.block_size, cache_dir)
    train_blocks, eval_blocks = split_blocks(blocks, cfg.validation_split_percentage, cfg.seed, cfg.max_eval_blocks)
    log.info(
        "pretraining stage %d: %d train blocks, %d eval blocks of %d tokens",
        cfg.stage,
        len(train_blocks),
        len(eval_blocks),
        cfg.block_size,
    )
    if cfg.stage == 1:
        freeze_all_but_embeddings(model, resize_info["old"] if cfg.stage1_new_rows_only else None)
    else:
        model = apply_lora(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = train(
        model,
        BlockSource(train_blocks),
        BlockSource(eval_blocks) if len(eval_blocks) else None,
        cfg,
        out_dir,
        resume=resume,
        world=world,
        stop_after_steps=stop_after_steps,
        on_log=on_log,
        durable_uri=durable_uri,
    )
    metrics = {
        **result.metrics,
        "stage": cfg.stage,
        "config": dataclasses.asdict(cfg),
        "resize": resize_info,
        "data": {"train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks), **cache_info},
        "base_model": str(base_model_dir),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
    }
    if world.is_main and result.steps >= result.metrics["total_steps"]:
        if cfg.stage == 1:
            modeling.save_model(model, tokenizer, out_dir / STAGE1_MODEL_DIR, extra={"stage": 1})
        else:
            with atomic_dir(out_dir / ADAPTER_DIR) as tmp:
                model.save_pretrained(str(tmp))
        with atomic_dir(out_dir / TOKENIZER_DIR) as tmp:
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        write_json(out_dir / "train_log.json", result.log_history)
        write_json(out_dir / "metrics.json", metrics)
    return metrics
