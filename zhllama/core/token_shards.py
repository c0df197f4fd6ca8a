"""Token shards: each corpus file tokenized once, in bounded memory and in parallel processes,
into a flat file of token ids in the narrowest dtype that holds the vocabulary (uint16 below
65,536 ids, else uint32), with a JSON sidecar; training reads fixed-length blocks from them by
index, never loading the corpus.

The format is nanoGPT's and Megatron's: a raw little-endian array a numpy memmap opens as it is
(``np.memmap(path, dtype)``). Chosen over ``datasets`` Arrow because a block is then one
contiguous read at ``index * block_size`` (Arrow stores a list per document, which the recipe
regroups with ``group_texts`` into a second copy), and 2 bytes a token instead of Arrow's 4-8.

A shard is cached under a key of the file's *content* (sha256), the tokenizer's files and the
format version, so adding or editing one file re-tokenizes only that file. The sidecar is
written last (its presence means the shard is whole); a shard whose size or hash no longer
matches its sidecar is rebuilt, never read as data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from zhllama.core.io import InputError, atomic_file, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

SHARD_VERSION = "token-shard-v1"
CHUNK_BYTES = 4 << 20  # text per task: a worker holds this and its ids (~2 MB as uint16), no more
ENCODE_BATCH = 1024  # lines per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One tokenized corpus file: ``tokens`` ids in ``path`` (raw ``dtype``), documents as
    ``bos ids eos`` one after another."""

    path: Path
    tokens: int
    dtype: str
    documents: int
    max_id: int
    sha256: str
    source: str
    source_sha256: str
    name: str = ""  # the file's name inside its data set (corpus/train.txt): the shard set's order

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` ids from position ``start``, one read of the file (no mapping kept, so a
        long run's resident memory does not grow with the pages it has touched)."""
        with open(self.path, "rb") as handle:
            handle.seek(start * self.itemsize)
            data = handle.read(count * self.itemsize)
        if len(data) != count * self.itemsize:
            raise InputError(f"{self.path}: shard shorter than its sidecar says ({self.tokens} tokens)")
        return np.frombuffer(data, dtype=self.dtype)

    def memmap(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


# --- tokenizing one file ---------------------------------------------------------------------------


def line_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """Byte ranges of about ``chunk_bytes`` that end at a line end, covering the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(size, start + chunk_bytes))
            handle.readline()  # to the end of the line the cut fell in
            end = min(size, handle.tell()) if start + chunk_bytes < size else size
            yield start, end
            start = end


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(tokenizer_json: str):
    if tokenizer_json not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[tokenizer_json] = Tokenizer.from_file(tokenizer_json)
    return _TOKENIZERS[tokenizer_json]


def encode_chunk(
    path: str, start: int, end: int, tokenizer_json: str, bos: int | None, eos: int | None, dtype: str
) -> dict[str, Any]:
    """Tokenize the lines in ``path[start:end]`` (a task of the pool, or called in-process).
    Returns the ids and the chunk's line count; a line that is not UTF-8 is returned as an
    error at its line within the chunk, so the caller can name the file's line."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    texts: list[str] = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            return {"error": (number, raw[err.start], err.start + 1), "lines": len(raw_lines)}
        if line.strip():
            texts.append(line)
    tokenizer = _tokenizer(tokenizer_json)
    head, tail = [bos] if bos is not None else [], [eos] if eos is not None else []
    parts: list[np.ndarray] = []
    for k in range(0, len(texts), ENCODE_BATCH):
        for enc in tokenizer.encode_batch(texts[k : k + ENCODE_BATCH], add_special_tokens=False):
            parts.append(np.asarray([*head, *enc.ids, *tail], dtype=dtype))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return {"ids": ids, "documents": len(texts), "lines": len(raw_lines)}


def _quiet_child() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _in_order(tasks: list[tuple], workers: int) -> Iterator[dict[str, Any]]:
    """Results of ``encode_chunk`` over ``tasks`` in order; at most 2 tasks per worker in
    flight, so memory stays bounded however long the file is."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield encode_chunk(*task)
        return
    # fork (as datasets' map(num_proc) does): a child starts in milliseconds and runs only the
    # tokenizer and numpy, never torch; its tokenizer works single-threaded (no nested pools)
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_child) as pool:
        pending: deque[Future] = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append(pool.submit(encode_chunk, *task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            task = next(queue, None)
            if task is not None:
                pending.append(pool.submit(encode_chunk, *task))
            yield result


def tokenize_file(
    path: str | os.PathLike[str],
    tokenizer_json: str | os.PathLike[str],
    out: str | os.PathLike[str],
    vocab_size: int,
    bos: int | None,
    eos: int | None,
    workers: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
    source_sha256: str | None = None,
    name: str = "",
) -> Shard:
    """Tokenize one corpus file (UTF-8, one document per non-blank line) into the shard ``out``
    (``out`` and ``out.json``, the sidecar last). Bad input: one ``InputError`` naming the
    file and line, and nothing left at ``out``."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise InputError(f"{path}: corpus file not found")
    dtype = token_dtype(vocab_size)
    tasks = [(str(path), s, e, str(tokenizer_json), bos, eos, dtype.name) for s, e in line_chunks(path, chunk_bytes)]
    digest, tokens, documents, max_id, lines_before = hashlib.sha256(), 0, 0, -1, 0
    sidecar(out).unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
    with atomic_file(out, mode="wb", encoding=None) as handle:
        for result in _in_order(tasks, workers):
            if "error" in result:
                line, byte, column = result["error"]
                raise InputError(
                    f"{path}:{lines_before + line}: not UTF-8 (byte 0x{byte:02x} at column {column}); "
                    "convert the file to UTF-8"
                )
            ids = result["ids"]
            if len(ids):
                max_id = max(max_id, int(ids.max()))
                data = ids.astype(dtype.newbyteorder("<"), copy=False).tobytes()
                handle.write(data)
                digest.update(data)
            tokens += len(ids)
            documents += result["documents"]
            lines_before += result["lines"]
        if max_id >= vocab_size:
            raise InputError(f"{tokenizer_json}: gives id {max_id}, not below the vocabulary size {vocab_size}")
    shard = Shard(
        path=out,
        tokens=tokens,
        dtype=dtype.name,
        documents=documents,
        max_id=max_id,
        sha256=digest.hexdigest(),
        source=str(path),
        source_sha256=source_sha256 or sha256_file(path),
        name=name or path.name,
    )
    write_json(sidecar(out), {**_fields(shard), "version": SHARD_VERSION, "mtime_ns": out.stat().st_mtime_ns})
    return shard


def sidecar(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + ".json")


def _fields(shard: Shard) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(shard).items()}


def file_is_whole(path: Path, size: int, sha256: str, written_mtime_ns: int | None, verify: bool | str = True) -> bool:
    """Whether a cached file still is what its sidecar says: the size always; the sha256 when
    the file changed since it was written (or ``verify='always'``). Warns what is wrong."""
    stat = path.stat()
    if stat.st_size != size:
        log.warning("%s: %d bytes, its sidecar says %d: truncated, rebuilding", path, stat.st_size, size)
        return False
    changed = verify == "always" or stat.st_mtime_ns != written_mtime_ns
    if verify and changed and sha256_file(path) != sha256:
        log.warning("%s: content hash differs from its sidecar: corrupt, rebuilding", path)
        return False
    return True


def open_shard(path: str | os.PathLike[str], verify: bool = True) -> Shard | None:
    """The shard at ``path`` if it is whole: its sidecar is there, its size matches, and (when
    the file changed since it was written, or ``verify='always'``) its sha256 does. None if
    it is missing, truncated or corrupt (the caller rebuilds it)."""
    path = Path(path)
    meta_path = sidecar(path)
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
        shard = Shard(**{f.name: meta[f.name] for f in dataclasses.fields(Shard) if f.name in meta} | {"path": path})
    except (InputError, KeyError, TypeError) as err:
        log.warning("%s: unreadable sidecar (%s): rebuilding", meta_path, err)
        return None
    if meta.get("version") != SHARD_VERSION:
        return None
    if not file_is_whole(path, shard.tokens * shard.itemsize, shard.sha256, meta.get("mtime_ns"), verify):
        return None
    return shard


# --- a corpus: one shard per file, cached by content -------------------------------------------------


def cached_source_sha256(path: Path, cache_dir: Path) -> str:
    """A file's sha256, remembered by (real path, size, mtime) so a start-up does not re-read a
    large unchanged corpus (DVC's state index does the same)."""
    stat = path.stat()
    stamp = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir / "source-hashes" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(memo) as handle:
        handle.write(digest)
    return digest


def shard_corpus(
    files: Sequence[str | os.PathLike[str]],
    tokenizer_dir: str | os.PathLike[str],
    tokenizer_fingerprint: str,
    vocab_size: int,
    bos: int | None,
    eos: int | None,
    cache_dir: Path,
    workers: int = 0,
) -> tuple[list[Shard], dict[str, Any]]:
    """One shard per corpus file, in the files' order, from the cache when whole; empty files
    are skipped with a warning, an all-empty corpus is an error. ``workers`` 0 = all cores."""
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise InputError(f"{tokenizer_dir}: no tokenizer.json (the fast tokenizer the model uses)")
    workers = workers or os.cpu_count() or 1
    shards, hits, built = [], 0, 0
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"{path}: corpus file not found")
        source = cached_source_sha256(path, cache_dir)
        key = hashlib.sha256(f"{SHARD_VERSION}|{tokenizer_fingerprint}|{source}".encode()).hexdigest()[:32]
        target = cache_dir / "shards" / f"{key}.bin"
        shard = open_shard(target)
        if shard is None:
            log.info("tokenizing %s (%.1f MB, %d process(es))", path, path.stat().st_size / 2**20, workers)
            shard = tokenize_file(path, tokenizer_json, target, vocab_size, bos, eos, workers, source_sha256=source)
            built += 1
        else:
            hits += 1
        if shard.tokens == 0:
            log.warning("%s: no non-blank lines: skipped", path)
            continue
        shards.append(shard)
    if not shards:
        raise InputError(f"{', '.join(map(str, files))}: corpus is empty (no non-blank lines)")
    info = {
        "cache": "hit" if built == 0 else "miss",
        "shards_cached": hits,
        "shards_built": built,
        "tokens": sum(s.tokens for s in shards),
        "dtype": shards[0].dtype,
        "cache_key": hashlib.sha256("|".join(s.sha256 for s in shards).encode()).hexdigest()[:32],
    }
    return shards, info


SHARD_FILE = "shard.bin"


def write_shard_dir(
    corpus_file: str | os.PathLike[str],
    name: str,
    tokenizer_dir: str | os.PathLike[str],
    vocab_size: int,
    bos: int | None,
    eos: int | None,
    out_dir: str | os.PathLike[str],
    workers: int = 0,
) -> Shard:
    """One corpus file's shard as a folder of its own (``shard.bin`` + sidecar): the output of
    one fan-out task of the pipeline, handed to the PT step with the others."""
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise InputError(f"{tokenizer_dir}: no tokenizer.json (the fast tokenizer the model uses)")
    return tokenize_file(
        corpus_file,
        tokenizer_json,
        Path(out_dir) / SHARD_FILE,
        vocab_size,
        bos,
        eos,
        workers or os.cpu_count() or 1,
        name=name,
    )


def read_shard_dirs(dirs: Sequence[str | os.PathLike[str]], vocab_size: int) -> list[Shard]:
    """The hand-off: every shard folder whole (size and sha256 checked now, whatever the file
    times say), ordered by the corpus file names (not by the order the tasks finished), one
    dtype, every id below the vocabulary size; empty shards dropped, an all-empty set refused."""
    shards = []
    for folder in dirs:
        shard = open_shard(Path(folder) / SHARD_FILE, verify="always")
        if shard is None:
            raise InputError(
                f"{folder}: not a whole token shard ({SHARD_FILE} and its sidecar, matching size and hash)"
            )
        shards.append(shard)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise InputError(f"token shards name one corpus file twice: {sorted(names)}")
    shards = sorted((s for s in shards if s.tokens), key=lambda s: s.name)
    if not shards:
        raise InputError(f"{', '.join(map(str, dirs))}: every token shard is empty")
    check_shards(shards, vocab_size)
    return shards


def check_shards(shards: Sequence[Shard], vocab_size: int) -> None:
    """The hand-off check: every shard whole, of one dtype, its ids below the vocabulary size."""
    if not shards:
        raise InputError("no token shards")
    dtypes = {s.dtype for s in shards}
    if len(dtypes) != 1:
        raise InputError(f"token shards of mixed dtypes {sorted(dtypes)}")
    for s in shards:
        if s.max_id >= vocab_size:
            raise InputError(f"{s.path}: id {s.max_id} is not below the vocabulary size {vocab_size} (from {s.source})")
        if s.path.stat().st_size != s.tokens * s.itemsize:
            raise InputError(f"{s.path}: size differs from its {s.tokens} tokens: truncated")


class TokenBlocks:
    """Fixed-length blocks cut from the shards' concatenation (the tail dropped, as the
    recipe's ``group_texts``), read by block index. ``index`` selects and orders a subset."""

    def __init__(self, shards: Sequence[Shard], block_size: int, index: np.ndarray | None = None) -> None:
        self.shards = list(shards)
        self.block_size = block_size
        self.starts = np.cumsum([0, *(s.tokens for s in self.shards)])
        self.total_blocks = int(self.starts[-1]) // block_size
        if self.total_blocks == 0:
            raise InputError(
                f"the corpus gives {int(self.starts[-1])} tokens, fewer than one block of {block_size}: "
                "add text or lower block_size"
            )
        self.index = index

    def __len__(self) -> int:
        return self.total_blocks if self.index is None else len(self.index)

    def select(self, positions: Sequence[int] | np.ndarray) -> TokenBlocks:
        chosen = np.asarray(positions, dtype=np.int64)
        return TokenBlocks(self.shards, self.block_size, chosen if self.index is None else self.index[chosen])

    def block(self, position: int) -> np.ndarray:
        number = int(position if self.index is None else self.index[position])
        start, end = number * self.block_size, (number + 1) * self.block_size
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, at = [], start
        for k in range(first, len(self.shards)):
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            take = min(end, hi) - at
            if take > 0:
                pieces.append(self.shards[k].read(at - lo, take))
                at += take
            if at >= end:
                break
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def read(self, positions: Sequence[int]) -> np.ndarray:
        """Blocks at ``positions`` as one int64 array [n, block_size]."""
        return np.stack([self.block(p) for p in positions]).astype(np.int64)
