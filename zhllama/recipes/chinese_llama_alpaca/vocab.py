"""The vocabulary stage: train a Chinese SentencePiece model, merge it into a base LLaMA
tokenizer (base pieces and ids unchanged, new pieces appended), save SentencePiece and
Hugging Face formats, and measure what the merge bought.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError, atomic_dir, sha256_file, write_json
from zhllama.core.settings import get_settings
from zhllama.recipes.chinese_llama_alpaca.configs import VocabConfig
from zhllama.recipes.chinese_llama_alpaca.corpus import check_corpus, count_chinese_chars, iter_corpus_lines

log = logging.getLogger(__name__)

CHINESE_SP_MODEL = "chinese_sp.model"
MERGED_SP_MODEL = "merged.model"
HF_TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.json"
PAD_TOKEN = "[PAD]"

# The base tokenizer when none is given: LLaMA's own from ../shared when that folder is
# beside the checkout, else Mistral 7B v0.1's (a LLaMA-style 32,000-piece SentencePiece BPE
# with byte fallback that the mistral-common wheel ships, so a bare machine still runs).
BASE_TOKENIZER_ENV = "ZHLLAMA_BASE_TOKENIZER"


def _pb():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def fallback_base_tokenizer() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no base tokenizer: give --base_tokenizer, or install mistral-common (`make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"


def resolve_base_tokenizer(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The base tokenizer: the given path (a SentencePiece model, a ``tokenizer.json``, or a
    Hugging Face folder holding either), else $ZHLLAMA_BASE_TOKENIZER, else LLaMA's from the
    shared data folder (``Settings.shared_dir``), else the mistral-common fallback."""
    for candidate in (explicit, os.environ.get(BASE_TOKENIZER_ENV)):
        if candidate:
            path = Path(candidate)
            if path.is_dir():
                found = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()]
                if not found:
                    raise InputError(f"{path}: no base tokenizer in it (tokenizer.model or tokenizer.json)")
                return found[0]
            if not path.is_file():
                raise InputError(f"{path}: base tokenizer not found")
            return path
    shared = get_settings().shared_dir / "data" / "llama-tokenizer.model"
    if shared.is_file():
        return shared
    return fallback_base_tokenizer()


def load_sp_proto(path: str | os.PathLike[str], role: str = "tokenizer"):
    """Parse a SentencePiece model file, or raise one clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {role} file not found")
    proto = _pb().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a SentencePiece model ({role}): {err}") from None
    if not proto.pieces:
        raise InputError(f"{path}: not a SentencePiece model ({role}): it holds no pieces")
    return proto


def train_sentencepiece(
    corpus_files: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], cfg: VocabConfig
) -> Path:
    """Train the Chinese SentencePiece model on the corpus; returns ``out_dir/chinese_sp.model``."""
    import sentencepiece as spm

    stats = check_corpus(corpus_files)
    log.info(
        "training SentencePiece (%s, vocab %d) on %d lines / %d chars",
        cfg.model_type,
        cfg.vocab_size,
        stats["lines"],
        stats["chars"],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / Path(CHINESE_SP_MODEL).stem
    spm.set_random_generator_seed(cfg.seed)  # sentence sampling/shuffling is then repeatable
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in corpus_files),
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=cfg.shuffle_input_sentence,
            max_sentence_length=cfg.max_sentence_length,
            num_threads=cfg.num_threads,
            byte_fallback=cfg.byte_fallback,
            normalization_rule_name=cfg.normalization_rule_name,
            split_digits=cfg.split_digits,
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size" in message or "vocab_size" in message:
            raise InputError(
                f"{', '.join(map(str, corpus_files))}: the corpus cannot support vocab_size={cfg.vocab_size} "
                f"({message.strip().splitlines()[-1]}); lower --vocab_size or add text"
            ) from None
        if "sentences_.empty()" in message:
            raise InputError(
                f"{', '.join(map(str, corpus_files))}: no line is shorter than max_sentence_length={cfg.max_sentence_length} bytes "
                "(the trainer skips longer lines): put one document or paragraph per line, or raise --max_sentence_length"
            ) from None
        raise
    return prefix.with_suffix(".model")


def merge_sp_models(
    base_path: str | os.PathLike[str], chinese_path: str | os.PathLike[str], new_piece_score: str = "descending"
):
    """Append each piece of the Chinese model that the base lacks. The base's pieces, ids and
    scores stay as they are. Returns (merged proto, number of pieces added)."""
    base = load_sp_proto(base_path, "base tokenizer")
    chinese = load_sp_proto(chinese_path, "Chinese SentencePiece model")
    normal = _pb().ModelProto.SentencePiece.Type.NORMAL
    known = {p.piece for p in base.pieces}
    # LLaMA gives never-merged pieces a -1e9 sentinel; the real ranking ends above it.
    ranked = [p.score for p in base.pieces if p.type == normal and p.score > -1e8]
    score = min(ranked) if ranked else 0.0
    added = 0
    for piece in chinese.pieces:
        if piece.type != normal or piece.piece in known:
            continue  # control/unknown/byte pieces of the Chinese model are the base's business
        new = _pb().ModelProto.SentencePiece()
        new.piece = piece.piece
        if new_piece_score == "zero":
            new.score = 0.0
        else:
            score -= 1.0
            new.score = score
        base.pieces.append(new)
        known.add(piece.piece)
        added += 1
    base.trainer_spec.vocab_size = len(base.pieces)
    return base, added


def _special_tokens(proto) -> dict[str, str]:
    spec = proto.trainer_spec
    pieces = proto.pieces
    tokens = {}
    for key, idx in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id)):
        if 0 <= idx < len(pieces):
            tokens[key] = pieces[idx].piece
    return tokens


def write_hf_tokenizer(
    sp_model: str | os.PathLike[str], out_dir: str | os.PathLike[str], model_max_length: int = 2048
) -> Path:
    """Write a Hugging Face LLaMA tokenizer directory that loads offline with
    ``AutoTokenizer.from_pretrained``: ``tokenizer.model`` (SentencePiece, the slow form) and
    ``tokenizer.json`` (the fast form converted from it)."""
    from transformers import AutoTokenizer

    proto = load_sp_proto(sp_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **_special_tokens(proto),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    # transformers converts tokenizer.model to the fast form; saving writes tokenizer.json
    # (save_pretrained omits tokenizer.model, which is already in place).
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    if len(tokenizer) != len(proto.pieces):
        raise RuntimeError(
            f"{out_dir}: Hugging Face tokenizer has {len(tokenizer)} tokens, SentencePiece {len(proto.pieces)}"
        )
    return out_dir


def add_pad_token(tokenizer: Any) -> int:
    """Give a tokenizer the recipe's distinct ``[PAD]`` token (never eos or unk); returns its id."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id in {tokenizer.eos_token_id, tokenizer.unk_token_id}:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return int(tokenizer.pad_token_id)


def tokenizer_stats(sp_model: str | os.PathLike[str], texts: Sequence[str]) -> dict[str, float]:
    """Tokens per character, per Chinese character and per byte, and the round-trip rate."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = processor.encode(list(texts))
    tokens = sum(map(len, ids))
    chars = sum(map(len, texts))
    zh_chars = sum(count_chinese_chars(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    round_trip = sum(processor.decode(i) == t for i, t in zip(ids, texts, strict=True))
    return {
        "vocab_size": processor.get_piece_size(),
        "tokens": tokens,
        "tokens_per_char": tokens / max(chars, 1),
        "tokens_per_chinese_char": tokens / max(zh_chars, 1),
        "tokens_per_byte": tokens / max(nbytes, 1),
        "round_trip_rate": round_trip / max(len(texts), 1),
        "unk_rate": sum(i == processor.unk_id() for seq in ids for i in seq) / max(tokens, 1),
    }


def fast_slow_agreement(tokenizer_dir: str | os.PathLike[str], texts: Sequence[str]) -> float:
    """Share of texts on which the Hugging Face (fast) and SentencePiece (slow) ids agree."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    slow = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    fast_ids = fast(list(texts), add_special_tokens=False)["input_ids"]
    return sum(f == s for f, s in zip(fast_ids, slow.encode(list(texts)), strict=True)) / max(len(texts), 1)


def merge_tokenizers(
    base_model: str | os.PathLike[str],
    chinese_model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    new_piece_score: str = "descending",
) -> dict[str, Any]:
    """Merge ``chinese_model`` into ``base_model``; write ``merged.model`` and the HF
    tokenizer directory under ``out_dir`` (which is written whole, or not at all)."""
    with atomic_dir(out_dir) as tmp:
        info = _merge_into(base_model, chinese_model, tmp, new_piece_score)
    return info


def _merge_into(base_model, chinese_model, out_dir: Path, new_piece_score: str) -> dict[str, Any]:
    merged, added = merge_sp_models(base_model, chinese_model, new_piece_score)
    (out_dir / MERGED_SP_MODEL).write_bytes(merged.SerializeToString())
    write_hf_tokenizer(out_dir / MERGED_SP_MODEL, out_dir / HF_TOKENIZER_DIR)
    return {"merged_vocab_size": len(merged.pieces), "pieces_added": added}


def run_vocab(
    train_files: Sequence[str | os.PathLike[str]],
    valid_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: VocabConfig,
    base_tokenizer: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The whole stage: train, merge, measure. Writes under ``out_dir``:
    ``chinese_sp.model``, ``merged.model``, ``tokenizer/`` (HF) and ``metrics.json``; for a
    byte-level BPE base (a ``tokenizer.json``), ``tokenizer/``, ``added_tokens.txt`` and
    ``metrics.json`` (see run_bpe_vocab)."""
    base_path = resolve_base_tokenizer(base_tokenizer)
    if base_path.suffix == ".json":
        return run_bpe_vocab(train_files, valid_files, out_dir, cfg, base_path)
    base_proto = load_sp_proto(base_path, "base tokenizer")  # fail before training, not after
    valid_texts = [line for path in valid_files for line in iter_corpus_lines(path)]
    if not valid_texts:
        raise InputError(f"{', '.join(map(str, valid_files))}: validation text is empty")
    log.info("base tokenizer: %s (%d pieces)", base_path, len(base_proto.pieces))
    with atomic_dir(out_dir) as tmp:
        started = time.perf_counter()
        chinese_path = train_sentencepiece(train_files, tmp, cfg)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        merge_info = _merge_into(base_path, chinese_path, tmp, cfg.new_piece_score)
        merge_seconds = time.perf_counter() - started
        log.info("measuring base vs merged on %d validation lines", len(valid_texts))
        base_stats = tokenizer_stats(base_path, valid_texts)
        merged_stats = tokenizer_stats(tmp / MERGED_SP_MODEL, valid_texts)
        metrics: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "base_tokenizer": str(base_path),
            "base_tokenizer_sha256": sha256_file(base_path),
            "merged_tokenizer_sha256": sha256_file(tmp / MERGED_SP_MODEL),
            "base_vocab_size": len(base_proto.pieces),
            "chinese_vocab_size": len(load_sp_proto(chinese_path).pieces),
            **merge_info,
            "train_seconds": round(train_seconds, 3),
            "merge_seconds": round(merge_seconds, 3),
            "valid_lines": len(valid_texts),
            "base": base_stats,
            "merged": merged_stats,
            "fast_slow_agreement": fast_slow_agreement(tmp / HF_TOKENIZER_DIR, valid_texts),
            "tokens_per_chinese_char_ratio": merged_stats["tokens_per_chinese_char"]
            / base_stats["tokens_per_chinese_char"],
        }
        write_json(tmp / METRICS_FILE, metrics)
    log.info(
        "vocab: %d -> %d pieces (+%d); tokens/Chinese char %.3f -> %.3f; trained in %.1f s",
        metrics["base_vocab_size"],
        metrics["merged_vocab_size"],
        metrics["pieces_added"],
        base_stats["tokens_per_chinese_char"],
        merged_stats["tokens_per_chinese_char"],
        train_seconds,
    )
    return metrics


ADDED_TOKENS_FILE = "added_tokens.txt"
BASE_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def fast_tokenizer_stats(tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """tokenizer_stats for a fast (Hugging Face) tokenizer: the one the model uses everywhere."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    tokens = sum(map(len, ids))
    chars = sum(map(len, texts))
    zh_chars = sum(count_chinese_chars(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    round_trip = sum(tokenizer.decode(i) == t for i, t in zip(ids, texts, strict=True))
    unk = tokenizer.unk_token_id
    return {
        "vocab_size": len(tokenizer),
        "tokens": tokens,
        "tokens_per_char": tokens / max(chars, 1),
        "tokens_per_chinese_char": tokens / max(zh_chars, 1),
        "tokens_per_byte": tokens / max(nbytes, 1),
        "round_trip_rate": round_trip / max(len(texts), 1),
        "unk_rate": 0.0 if unk is None else sum(i == unk for seq in ids for i in seq) / max(tokens, 1),
    }


def run_bpe_vocab(
    train_files: Sequence[str | os.PathLike[str]],
    valid_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: VocabConfig,
    base_json: Path,
) -> dict[str, Any]:
    """The vocabulary stage for a byte-level BPE base: continued BPE training from the base's
    merges (bpe_extend.py), measured as the SentencePiece path is (plus the extension's
    invariants: ids and merge order kept, new tokens reachable, English unchanged)."""
    import json

    from transformers import AutoTokenizer

    from zhllama.recipes.chinese_llama_alpaca import bpe_extend

    data = bpe_extend.read_tokenizer_json(base_json)
    if not bpe_extend.is_byte_level_bpe(data):
        raise InputError(
            f"{base_json}: the base tokenizer is neither SentencePiece (tokenizer.model) nor byte-level BPE "
            f"(its model is {data['model'].get('type')!r}); cannot extend it"
        )
    base_dir = base_json.parent
    base = AutoTokenizer.from_pretrained(str(base_dir))
    valid_texts = [line for path in valid_files for line in iter_corpus_lines(path)]
    if not valid_texts:
        raise InputError(f"{', '.join(map(str, valid_files))}: validation text is empty")
    log.info("base tokenizer: %s (byte-level BPE, %d tokens)", base_json, len(base))
    with atomic_dir(out_dir) as tmp:
        started = time.perf_counter()
        extended, info = bpe_extend.extend_byte_level_bpe(base, train_files, cfg.bpe_new_tokens, cfg.bpe_min_frequency)
        train_seconds = time.perf_counter() - started
        hf_dir = tmp / HF_TOKENIZER_DIR
        hf_dir.mkdir()
        (hf_dir / "tokenizer.json").write_text(json.dumps(extended, ensure_ascii=False), encoding="utf-8")
        for name in BASE_TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, hf_dir / name)
        merged = AutoTokenizer.from_pretrained(str(hf_dir))
        if len(merged) != len(base) + info["tokens_added"]:
            raise RuntimeError(f"{hf_dir}: {len(merged)} tokens, expected {len(base)} + {info['tokens_added']}")
        added = [merged.convert_ids_to_tokens(i) for i in range(len(base), len(merged))]
        with open(tmp / ADDED_TOKENS_FILE, "w", encoding="utf-8") as handle:
            for token in added:
                handle.write(bpe_extend.token_bytes(token).decode("utf-8", errors="backslashreplace") + "\n")
        log.info("measuring base vs extended on %d validation lines", len(valid_texts))
        checks = bpe_extend.check_extension(base, merged, valid_texts)
        base_stats = fast_tokenizer_stats(base, valid_texts)
        merged_stats = fast_tokenizer_stats(merged, valid_texts)
        metrics: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "method": "byte_level_bpe_continued",
            "base_tokenizer": str(base_json),
            "base_tokenizer_sha256": sha256_file(base_json),
            "merged_tokenizer_sha256": sha256_file(hf_dir / "tokenizer.json"),
            "base_vocab_size": len(base),
            "merged_vocab_size": len(merged),
            "pieces_added": info["tokens_added"],
            **{k: v for k, v in info.items() if k != "tokens_added"},
            **checks,
            "train_seconds": round(train_seconds, 3),
            "valid_lines": len(valid_texts),
            "base": base_stats,
            "merged": merged_stats,
            "tokens_per_chinese_char_ratio": merged_stats["tokens_per_chinese_char"]
            / base_stats["tokens_per_chinese_char"],
        }
        broken = [
            k
            for k in ("base_ids_kept", "base_merges_kept", "new_ids_after_base", "english_sample_unchanged")
            if not checks[k]
        ]
        if broken or checks["added_reachable_by_bytes"] < 1.0:
            raise RuntimeError(f"BPE extension broke an invariant: {broken or 'unreachable new tokens'} ({checks})")
        write_json(tmp / METRICS_FILE, metrics)
    log.info(
        "vocab (byte-level BPE): %d -> %d tokens (+%d); tokens/Chinese char %.3f -> %.3f; trained in %.1f s",
        len(base),
        len(merged),
        info["tokens_added"],
        base_stats["tokens_per_chinese_char"],
        merged_stats["tokens_per_chinese_char"],
        train_seconds,
    )
    return metrics
