"""Instruction tuning on alpaca-format data (run_clm_sft_with_peft.py): prompt tokens are
masked out of the loss, a distinct ``[PAD]`` is added, batches are grouped by length."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhllama.core.io import InputError, atomic_dir, atomic_file, read_json, write_json
from zhllama.core.training.loop import Dist, init_distributed, train
from zhllama.core.training.loss import IGNORE_INDEX, pad_rows
from zhllama.recipes.chinese_llama_alpaca import modeling
from zhllama.recipes.chinese_llama_alpaca.configs import SftConfig
from zhllama.recipes.chinese_llama_alpaca.pretrain import ADAPTER_DIR, TOKENIZER_DIR, apply_lora
from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt
from zhllama.recipes.chinese_llama_alpaca.vocab import add_pad_token

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
SFT_CACHE_VERSION = "sft-tokens-v1"
TOKENIZE_BATCH = 1024  # records per batched tokenizer call


def _check_record(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for field in ("instruction", "output"):
        if field not in record:
            raise InputError(f"{where}: missing field {field!r}")
    for field in FIELDS:
        if field in record and record[field] is not None and not isinstance(record[field], str):
            raise InputError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


READ_BYTES = 1 << 20  # streamed JSON is read this much at a time
MAX_RECORD_BYTES = 64 << 20  # one record larger than this is an error, not a reason to read the file whole


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int) -> InputError:
    return InputError(f"{path}: not UTF-8 ({err.reason} at byte {offset + err.start})")


def _iter_json_array(path: Path, handle) -> Iterator[tuple[str, Any]]:
    """The items of a JSON list, parsed one at a time from a sliding buffer (the file is never
    held whole: a million-record file streams in bounded memory)."""
    decoder = json.JSONDecoder()
    buffer, line, eof, index, offset = "", 1, False, 0, 0
    decode = codecs.getincrementaldecoder("utf-8")()

    def more() -> bool:
        nonlocal buffer, eof, offset
        chunk = handle.read(READ_BYTES)
        try:
            buffer += decode.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err, offset) from None
        offset += len(chunk)
        eof = not chunk
        return bool(chunk)

    def skip(chars: str) -> None:
        nonlocal buffer, line
        while True:
            stripped = buffer.lstrip(chars)
            line += buffer.count("\n", 0, len(buffer) - len(stripped))
            buffer = stripped
            if buffer or not more():
                return

    skip(" \t\r\n")
    if not buffer.startswith("["):
        raise InputError(f"{path}: expected a JSON list of records or JSONL (one record per line)")
    buffer = buffer[1:]
    skip(" \t\r\n")
    if buffer.startswith("]"):
        return
    while True:
        skip(" \t\r\n")
        while True:
            try:
                item, end = decoder.raw_decode(buffer)
                break
            except json.JSONDecodeError as err:
                if eof or len(buffer) > MAX_RECORD_BYTES:
                    where = line + buffer.count("\n", 0, err.pos)
                    raise InputError(f"{path}:{where}: malformed JSON ({err.msg})") from None
                more()
        yield f"{path}: record {index}", item
        index += 1
        line += buffer.count("\n", 0, end)
        buffer = buffer[end:]
        skip(" \t\r\n")
        if buffer.startswith(","):
            buffer = buffer[1:]
            continue
        if buffer.startswith("]"):
            return
        raise InputError(f"{path}:{line}: malformed JSON (expected ',' or ']' after record {index - 1})")


def _one_object_file(path: Path) -> None:
    """Raise the shape error when the whole file is one JSON object (not a list, not JSONL)."""
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        raise InputError(
            f"{path}: expected a JSON list of records or JSONL (one record per line), "
            f"got an object with keys {sorted(whole)[:5]}"
        )


def iter_alpaca(path: str | os.PathLike[str]) -> Iterator[dict[str, str]]:
    """Alpaca-format records, checked one by one as they stream from JSON (a list of objects)
    or JSONL (one object per line): neither is parsed into memory whole."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: instruction file not found")
    with open(path, "rb") as handle:
        head = handle.read(4096)
        try:
            first = head.decode("utf-8", errors="strict" if len(head) < 4096 else "ignore").lstrip()
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err, 0) from None
        if not first and not handle.read(1):
            raise InputError(f"{path}: instruction file is empty")
        handle.seek(0)
        count = 0
        if first.startswith("["):
            for where, record in _iter_json_array(path, handle):
                count += 1
                yield _check_record(record, where)
        else:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputError(f"{path}:{lineno}: not UTF-8 ({err.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    if count == 0 and path.stat().st_size <= MAX_RECORD_BYTES:
                        _one_object_file(path)  # a pretty-printed object: say what shape it has
                    raise InputError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno})") from None
                if isinstance(record, dict) and "instruction" not in record and lineno == 1:
                    raise InputError(
                        f"{path}: expected a JSON list of records or JSONL (one record per line), "
                        f"got an object with keys {sorted(record)[:5]}"
                    )
                if not isinstance(record, dict) and count == 0:
                    raise InputError(
                        f"{path}: expected a JSON list of records or JSONL (one record per line), "
                        f"got a {type(record).__name__}"
                    )
                count += 1
                yield _check_record(record, f"{path}:{lineno}")
        if count == 0:
            raise InputError(f"{path}: no instruction records")


def read_alpaca(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Every record of an alpaca-format JSON or JSONL file (small files: evaluation splits)."""
    return list(iter_alpaca(path))


def tokenize_example(tokenizer, record: dict[str, str], max_seq_length: int) -> tuple[list[int], list[int]]:
    """input_ids = bos + prompt + output + eos, truncated; labels -100 over bos + prompt."""
    source = tokenizer(build_prompt(record["instruction"], record["input"]), add_special_tokens=True)["input_ids"]
    target = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (source + target)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(source) + target)[:max_seq_length]
    return ids, labels


class TokenizedExamples:
    """Tokenized examples in two flat arrays, memory-mapped from the cache: every example's ids
    one after another (the narrowest dtype that holds the vocabulary) and an index of
    (offset, length, prompt length) per example; labels are the ids with the prompt masked."""

    def __init__(self, ids: np.ndarray, index: np.ndarray) -> None:
        self.ids, self.index = ids, index

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        return self.index[:, 1]

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        offset, length, prompt = (int(v) for v in self.index[i])
        ids = self.ids[offset : offset + length].tolist()
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


class SftSource:
    """Instruction examples (a TokenizedExamples store, or rows as lists) and any replayed text
    rows after them, as one source the loop orders and collates."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]] | TokenizedExamples, pad_id: int) -> None:
        self.parts: list[Any] = [examples]
        self.pad_id = pad_id

    def add(self, rows: Sequence[tuple[list[int], list[int]]] | TokenizedExamples) -> None:
        self.parts.append(rows)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def lengths(self) -> list[int]:
        out: list[int] = []
        for part in self.parts:
            out.extend(part.lengths().tolist() if isinstance(part, TokenizedExamples) else [len(r[0]) for r in part])
        return out

    def example(self, i: int) -> tuple[list[int], list[int]]:
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad input_ids with the pad id, labels with -100, attention_mask 0 over padding."""
        return pad_rows([self.example(i) for i in indices], self.pad_id)


def tokenize_records(tokenizer, records: Sequence[dict[str, str]], max_seq_length: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per record, batched through the fast tokenizer (its Rust threads
    share the batch out); the same ids as tokenize_example, record by record (tested)."""
    prompts = [build_prompt(r["instruction"], r["input"]) for r in records]
    sources = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    targets = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    out = []
    for source, target in zip(sources, targets, strict=True):
        ids = (source + target + [tokenizer.eos_token_id])[:max_seq_length]
        out.append((ids, min(len(source), max_seq_length)))
    return out


def tokenizer_content_key(tokenizer) -> str:
    """The tokenizer's whole state (vocabulary, merges, added tokens such as [PAD]) hashed."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def tokenized_examples(
    path: str | os.PathLike[str], tokenizer, max_seq_length: int, cache_dir: Path | None = None, limit: int = 0
) -> tuple[TokenizedExamples, dict[str, Any]]:
    """The file's examples tokenized in batches as its records stream in, cached under a key
    of the file's and the tokenizer's contents and max_seq_length: a million-record file is
    never held whole, as records or as Python ints. Examples whose prompt fills
    max_seq_length (no target left) are dropped."""
    from zhllama.core.token_shards import cached_source_sha256, token_dtype
    from zhllama.recipes.chinese_llama_alpaca.pretrain import default_cache_dir

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: instruction file not found")
    cache_dir = cache_dir or default_cache_dir()
    source_sha = cached_source_sha256(path, cache_dir)
    key = hashlib.sha256(
        f"{SFT_CACHE_VERSION}|{tokenizer_content_key(tokenizer)}|{source_sha}|{max_seq_length}|{limit}".encode()
    ).hexdigest()[:32]
    root = cache_dir / "sft"
    ids_path, index_path, meta_path = root / f"{key}.ids", root / f"{key}.index.npy", root / f"{key}.json"
    cached = _open_examples(ids_path, index_path, meta_path)
    if cached is not None:
        return cached, {"cache": "hit", "cache_key": key}
    dtype = token_dtype(len(tokenizer))
    rows: list[np.ndarray] = []
    batch: list[dict[str, str]] = []
    offset = seen = 0
    digest = hashlib.sha256()
    meta_path.unlink(missing_ok=True)

    def flush(handle) -> None:
        nonlocal offset
        for ids, prompt in tokenize_records(tokenizer, batch, max_seq_length):
            if prompt >= len(ids):
                continue  # the prompt filled max_seq_length
            data = np.asarray(ids, dtype=dtype).astype(dtype.newbyteorder("<"), copy=False).tobytes()
            handle.write(data)
            digest.update(data)
            rows.append(np.asarray([offset, len(ids), prompt], dtype=np.int64))
            offset += len(ids)
        batch.clear()

    with atomic_file(ids_path, mode="wb", encoding=None) as handle:
        for record in iter_alpaca(path):
            batch.append(record)
            seen += 1
            if len(batch) == TOKENIZE_BATCH:
                flush(handle)
            if limit and seen == limit:
                break
        flush(handle)
    if not rows:
        raise InputError(f"{path}: every example's prompt is longer than max_seq_length={max_seq_length}")
    index = np.stack(rows)
    with atomic_file(index_path, mode="wb", encoding=None) as handle:
        np.save(handle, index)
    write_json(
        meta_path,
        {
            "version": SFT_CACHE_VERSION,
            "dtype": dtype.name,
            "tokens": offset,
            "examples": len(index),
            "ids_sha256": digest.hexdigest(),
            "ids_mtime_ns": ids_path.stat().st_mtime_ns,
            "source": str(path),
            "source_sha256": source_sha,
        },
    )
    log.info("%s: %d examples tokenized (%d tokens, %s)", path, len(index), offset, dtype.name)
    ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(offset,))
    return TokenizedExamples(ids, np.load(index_path, mmap_mode="r")), {"cache": "miss", "cache_key": key}


def _open_examples(ids_path: Path, index_path: Path, meta_path: Path) -> TokenizedExamples | None:
    """The cached examples when whole (sidecar there, sizes match, hash when the file changed)."""
    if not (ids_path.is_file() and index_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        index = np.load(index_path, mmap_mode="r")
    except (InputError, ValueError, OSError) as err:
        log.warning("%s: unreadable cache (%s): re-tokenizing", index_path, err)
        return None
    from zhllama.core.token_shards import file_is_whole

    if meta.get("version") != SFT_CACHE_VERSION or index.shape != (meta["examples"], 3):
        return None
    size = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not file_is_whole(ids_path, size, meta["ids_sha256"], meta["ids_mtime_ns"]):
        return None
    ids = np.memmap(ids_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    return TokenizedExamples(ids, index)


def text_rows(
    files: Sequence[str | os.PathLike[str]], tokenizer, count: int, tokens: int, seed: int
) -> TokenizedExamples:
    """``count`` rows of plain corpus text (bos + ``tokens`` ids, every token a target), from
    lines in a seeded order: the replay share of SFT batches. The corpus is indexed, not read
    whole (it is the PT corpus: gigabytes at the recipe's scale); the rows are kept compact."""
    import random

    from zhllama.recipes.chinese_llama_alpaca.corpus import line_index, read_line

    paths, which, offsets = line_index(files)
    order = array("q", range(len(offsets)))
    random.Random(seed).shuffle(order)  # the permutation depends only on the length: as shuffling the lines
    dtype = np.int64
    pieces: list[np.ndarray] = []
    index: list[tuple[int, int, int]] = []
    at = 0
    for i in order:
        ids = tokenizer(read_line(paths[which[i]], offsets[i]), add_special_tokens=False)["input_ids"]
        for k in range(0, len(ids) - tokens // 2, tokens):  # no short tail rows
            row = np.asarray([tokenizer.bos_token_id, *ids[k : k + tokens]], dtype=dtype)
            pieces.append(row)
            index.append((at, len(row), 1))  # bos is no target
            at += len(row)
            if len(index) == count:
                break
        if len(index) == count:
            break
    if not index:
        raise InputError(f"{', '.join(map(str, files))}: no text of {tokens // 2}+ tokens to replay")
    return TokenizedExamples(np.concatenate(pieces), np.asarray(index, dtype=np.int64))


def build_source(path, tokenizer, max_seq_length: int, limit: int = 0, cache_dir: Path | None = None) -> SftSource:
    examples, _ = tokenized_examples(path, tokenizer, max_seq_length, cache_dir, limit)
    return SftSource(examples, tokenizer.pad_token_id)


def closed_answer_accuracy(
    valid_file: str | os.PathLike[str], tokenizer, cfg: SftConfig
) -> Callable[[Any], dict[str, float]] | None:
    """When the validation split is a closed-answer task (a few distinct outputs, as the
    default sentiment task), a function giving the model's accuracy on it (the most likely
    option is the answer): every evaluation logs it as ``eval_accuracy``, the curve of accuracy
    against SFT steps. None for open-ended data."""
    from zhllama.recipes.chinese_llama_alpaca.scoring import closed_options, rank_options

    records = read_alpaca(valid_file)
    if cfg.max_eval_examples:
        records = records[: cfg.max_eval_examples]
    options = closed_options(records)
    if options is None:
        return None

    def accuracy(model) -> dict[str, float]:
        ranked = rank_options(model, tokenizer, records, options, cfg.per_device_eval_batch_size, cfg.max_seq_length)
        return {"eval_accuracy": ranked["accuracy"]}

    return accuracy


def training_source(
    train_file: str | os.PathLike[str], text_files: Sequence[str | os.PathLike[str]], tokenizer, cfg: SftConfig
) -> tuple[SftSource, int]:
    """The instruction examples, plus ``cfg.text_mix_share`` of rows replayed from the corpus
    (grouped by length, they form batches of their own: about that share of optimizer steps is
    plain language modelling). Returns the source and the number of replayed rows."""
    source = build_source(train_file, tokenizer, cfg.max_seq_length)
    if not cfg.text_mix_share:
        return source, 0
    if not text_files:
        raise InputError("sft.text_mix_share > 0 needs the corpus text to replay (--mix_text)")
    wanted = round(len(source) * cfg.text_mix_share / (1 - cfg.text_mix_share))
    extra = text_rows(text_files, tokenizer, wanted, cfg.text_mix_tokens, cfg.seed)
    source.add(extra)
    log.info(
        "replaying %d rows of %d corpus tokens (%.0f%% of rows)",
        len(extra),
        cfg.text_mix_tokens,
        100 * cfg.text_mix_share,
    )
    return source, len(extra)


def prepare_model(model_dir, cfg: SftConfig):
    model = modeling.load_model(model_dir)
    tokenizer = modeling.load_tokenizer(model_dir)
    modeling.check_vocab(model, tokenizer, str(model_dir))
    pad_id = add_pad_token(tokenizer)
    info = modeling.resize_embeddings(model, tokenizer, None, init="mean_of_pieces")  # [PAD]: mean of all rows
    model.config.pad_token_id = pad_id
    return model, tokenizer, info


def run_sft(
    model_dir: str | os.PathLike[str],
    train_file: str | os.PathLike[str],
    valid_file: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    cfg: SftConfig,
    resume: bool = False,
    stop_after_steps: int | None = None,
    world: Dist | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    text_files: Sequence[str | os.PathLike[str]] = (),
    durable_uri: str = "",
) -> dict[str, Any]:
    """SFT with LoRA from the PT-merged model; writes ``adapter/``, ``tokenizer/`` (with
    ``[PAD]``), ``train_log.json`` and ``metrics.json``. With ``cfg.text_mix_share``, rows of
    ``text_files`` (the PT corpus) join the training examples."""
    world = world or init_distributed()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer, resize_info = prepare_model(model_dir, cfg)
    train_source, replayed = training_source(train_file, text_files, tokenizer, cfg)
    eval_source = build_source(valid_file, tokenizer, cfg.max_seq_length, cfg.max_eval_examples) if valid_file else None
    log.info(
        "SFT: %d train examples, %d eval examples, pad id %d",
        len(train_source),
        len(eval_source) if eval_source else 0,
        tokenizer.pad_token_id,
    )
    model = apply_lora(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_metrics = closed_answer_accuracy(valid_file, tokenizer, cfg) if valid_file else None
    result = train(
        model,
        train_source,
        eval_source,
        cfg,
        out_dir,
        resume=resume,
        group_by_length=cfg.group_by_length,
        world=world,
        stop_after_steps=stop_after_steps,
        on_log=on_log,
        eval_metrics=eval_metrics,
        durable_uri=durable_uri,
    )
    metrics = {
        **result.metrics,
        "config": dataclasses.asdict(cfg),
        "resize": resize_info,
        "pad_token_id": tokenizer.pad_token_id,
        "train_examples": len(train_source) - replayed,
        "replayed_text_rows": replayed,
        "base_model": str(model_dir),
    }
    if world.is_main and result.steps >= result.metrics["total_steps"]:
        with atomic_dir(out_dir / ADAPTER_DIR) as tmp:
            model.save_pretrained(str(tmp))
        with atomic_dir(out_dir / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(str(tmp))
            modeling.copy_sp_model(tokenizer, tmp)
        write_json(out_dir / "train_log.json", result.log_history)
        write_json(out_dir / "metrics.json", metrics)
    return metrics
