"""Merge LoRA adapters into the base weights, in order (the recipe: base + PT, then
base + PT + SFT), giving a full Hugging Face model.

Two modes give the same weights:
* default: load the model, apply each adapter with PEFT and ``merge_and_unload``;
* ``low_memory``: stream the base's safetensors shards one at a time, add each adapter's
  ``scaling * B @ A`` (or take its full ``modules_to_save`` tensor) and write the shard; peak
  memory is about the largest shard plus the adapters, not twice the model.

A merged model records the sha256 of every adapter merged into it; merging one of them
again is refused (it would add the delta twice).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zhllama.core.io import InputError, atomic_dir, read_json, sha256_file, write_json
from zhllama.recipes.chinese_llama_alpaca import modeling

log = logging.getLogger(__name__)

MERGE_RECORD = "zhllama_merge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def resolve_adapter(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """An adapter directory, or a training run directory holding ``adapter/`` (and
    ``tokenizer/``); returns (adapter dir, tokenizer dir or None)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            tokenizer = next((t for t in (path / "tokenizer", candidate) if (t / "tokenizer.json").is_file()), None)
            return candidate, tokenizer
    raise InputError(
        f"{path}: no LoRA adapter (expected adapter_config.json and {ADAPTER_WEIGHTS}, or an adapter/ folder)"
    )


def merged_adapters(model_dir: Path) -> list[str]:
    record = model_dir / MERGE_RECORD
    return list(read_json(record).get("adapters", [])) if record.is_file() else []


def _adapter_vocab_rows(adapter_dir: Path) -> int | None:
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            if key.endswith("embed_tokens.weight") and "lora_" not in key:
                return handle.get_slice(key).get_shape()[0]
    return None


def _check_order(base: Path, adapters: Sequence[Path]) -> list[str]:
    already = merged_adapters(base)
    hashes = []
    for adapter in adapters:
        digest = sha256_file(adapter / ADAPTER_WEIGHTS)
        if digest in already or digest in hashes:
            raise InputError(
                f"{adapter}: this adapter is already merged into {base}; merging it again would apply it twice"
            )
        hashes.append(digest)
    return already + hashes


def merge_adapters(
    base_model_dir: str | os.PathLike[str],
    adapter_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    low_memory: bool = False,
    max_shard_size: str = "2GB",
) -> dict[str, Any]:
    """Apply ``adapter_paths`` in order onto ``base_model_dir``; write a full model + tokenizer."""
    base = modeling.check_model_dir(base_model_dir)
    if not adapter_paths:
        raise InputError("no adapters to merge")
    resolved = [resolve_adapter(p) for p in adapter_paths]
    adapters = [a for a, _ in resolved]
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else resolved[-1][1] or base
    tokenizer = modeling.load_tokenizer(tokenizer_dir)
    record = {"adapters": _check_order(base, adapters), "base": str(base), "order": [str(a) for a in adapters]}
    final_rows = next((r for r in (_adapter_vocab_rows(a) for a in reversed(adapters)) if r), None)
    if final_rows is not None and final_rows != len(tokenizer):
        raise InputError(
            f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens but the last adapter's embeddings have {final_rows} rows"
        )
    log.info("merging %d adapter(s) into %s (%s mode)", len(adapters), base, "low-memory" if low_memory else "default")
    if low_memory:
        _merge_streaming(base, adapters, Path(out_dir), tokenizer, record)
    else:
        model = modeling.load_model(base)
        model = apply_adapters(model, adapters)
        untie_if_apart(model)
        modeling.check_vocab(model, tokenizer, f"merged model vs {tokenizer_dir}")
        model.config.pad_token_id = tokenizer.pad_token_id  # SFT's [PAD] must reach the model's config
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        modeling.save_model(model, tokenizer, out_dir, max_shard_size=max_shard_size)
        write_json(Path(out_dir) / MERGE_RECORD, record)
    return {"out_dir": str(out_dir), "adapters": len(adapters), "vocab_size": len(tokenizer)}


def apply_adapters(model, adapters: Sequence[Path]):
    """Merge each adapter in turn into an in-memory model (resizing to its vocabulary first)."""
    from peft import PeftModel

    for adapter in adapters:
        rows = _adapter_vocab_rows(adapter)
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)  # the adapter brings these rows whole
            model.config.vocab_size = rows
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as err:
            raise InputError(f"{adapter}: adapter does not fit the model: {err}") from None
        model = peft_model.merge_and_unload()
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"adapter layers left after merging: {leftover[:3]}")
    return model


def untie_if_apart(model) -> bool:
    """A tied base whose adapter trained embed_tokens and lm_head as two copies
    (tied_embeddings=untie) merges into two matrices: the config must then say untied, or
    saving would keep one and loading re-tie it to the other, silently dropping a trained
    lm_head. Returns True when it unties."""
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    if inp is out or torch.equal(inp, out):
        if inp is not out:
            model.get_output_embeddings().weight = inp
        return False
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    log.info("merged embed_tokens and lm_head differ: the merged model is untied (its own lm_head)")
    return True


def _adapter_deltas(
    adapter: Path,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], float]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".lora_A." in name or ".lora_B." in name:
            module, part = (name.split(".lora_A.")[0], "A") if ".lora_A." in name else (name.split(".lora_B.")[0], "B")
            lora.setdefault(f"{module}.weight", {})[part] = value
        else:
            full[name] = value
    return {k: (v["A"], v["B"]) for k, v in lora.items()}, full, scaling


def _merge_streaming(base: Path, adapters: Sequence[Path], out_dir: Path, tokenizer, record: dict[str, Any]) -> None:
    index_path = base / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path)["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (base / "model.safetensors").is_file():
        shards, weight_map = ["model.safetensors"], None
    else:
        raise InputError(f"{base}: low-memory merge needs safetensors weights")
    loaded = [_adapter_deltas(a) for a in adapters]
    config = read_json(base / "config.json")
    vocab_rows = config["vocab_size"]
    # A tied base stores only embed_tokens; an adapter that trained lm_head apart (untie) brings it.
    lm_head = next((full["lm_head.weight"] for _, full, _ in reversed(loaded) if "lm_head.weight" in full), None)
    tied = bool(config.get("tie_word_embeddings", False))
    with atomic_dir(out_dir) as tmp:
        total_size = 0
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(base / shard), "pt") as handle:
                metadata = handle.metadata()
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    tensor = handle.get_tensor(key)
                    dtype = tensor.dtype
                    for lora, full, scaling in loaded:
                        if key in full:
                            tensor = full[key].to(dtype)
                        elif key in lora:
                            a, b = lora[key]
                            tensor = (tensor.float() + scaling * (b.float() @ a.float())).to(dtype)
                    if key.endswith("embed_tokens.weight"):
                        vocab_rows = tensor.shape[0]
                        if tied and lm_head is not None and not torch.equal(lm_head.to(dtype), tensor):
                            out["lm_head.weight"] = lm_head.to(dtype).contiguous()
                            total_size += lm_head.numel() * tensor.element_size()
                            if weight_map is not None:
                                weight_map["lm_head.weight"] = shard
                            config["tie_word_embeddings"] = False
                            log.info("merged embed_tokens and lm_head differ: the merged model is untied")
                    out[key] = tensor.contiguous()
                    total_size += tensor.numel() * tensor.element_size()
            save_file(out, str(tmp / shard), metadata=metadata or {"format": "pt"})
            log.info("merged shard %s (%d tensors)", shard, len(out))
            del out
        if weight_map is not None:
            write_json(
                tmp / "model.safetensors.index.json", {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            )
        config["vocab_size"] = vocab_rows
        config["pad_token_id"] = tokenizer.pad_token_id
        write_json(tmp / "config.json", config)
        if (base / "generation_config.json").is_file():
            shutil.copyfile(base / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(str(tmp))
        modeling.copy_sp_model(tokenizer, tmp)
        write_json(tmp / MERGE_RECORD, record)
    if vocab_rows != len(tokenizer):
        raise InputError(f"{out_dir}: merged embeddings have {vocab_rows} rows, tokenizer {len(tokenizer)}")
