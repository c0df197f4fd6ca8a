"""Token shards (zhllama/core/token_shards.py): the same blocks as tokenizing everything in
memory, in parallel and in chunks; the narrowest dtype; per-file caching by content; bad input
named by file and line; truncated or corrupt shards rebuilt; memory flat as the corpus grows."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zhllama.core.io import InputError
from zhllama.core.token_shards import TokenBlocks, check_shards, shard_corpus, token_dtype, tokenize_file
from zhllama.recipes.chinese_llama_alpaca.modeling import load_tokenizer
from zhllama.recipes.chinese_llama_alpaca.pretrain import tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok(vocab_run: Path):
    return load_tokenizer(vocab_run / "tokenizer")


def shards_of(files, vocab_run, tok, cache, **kw):
    return shard_corpus(
        files,
        vocab_run / "tokenizer",
        tokenizer_fingerprint(vocab_run / "tokenizer"),
        len(tok),
        tok.bos_token_id,
        tok.eos_token_id,
        cache,
        **kw,
    )


def in_memory_blocks(files, tok, block_size: int) -> np.ndarray:
    """What the recipe's group_texts gives: every document bos ids eos, concatenated, cut."""
    lines = [line for f in files for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    flat = [
        t
        for ids in tok(lines, add_special_tokens=False)["input_ids"]
        for t in [tok.bos_token_id, *ids, tok.eos_token_id]
    ]
    n = len(flat) // block_size
    return np.asarray(flat[: n * block_size], dtype=np.int64).reshape(n, block_size)


def two_files(tmp_path: Path, small_corpus) -> list[Path]:
    lines = small_corpus["train"].read_text(encoding="utf-8").splitlines()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(lines[:1700]) + "\n\n   \n", encoding="utf-8")  # blank lines are no documents
    b.write_text("\r\n".join(lines[1700:]), encoding="utf-8")  # CRLF, no final newline
    return [a, b]


def test_blocks_equal_the_in_memory_path_in_chunks_and_processes(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    files = two_files(tmp_path, small_corpus)
    want = in_memory_blocks(files, tok, 64)
    shards, info = shards_of(files, vocab_run, tok, tmp_path / "c1", workers=1)
    assert info["shards_built"] == 2 and [s.dtype for s in shards] == ["uint16", "uint16"]
    blocks = TokenBlocks(shards, 64)
    assert np.array_equal(blocks.read(range(len(blocks))), want)  # blocks span the files' boundary too
    # small chunks over 2 processes: the same ids, in order
    for shard in shards:
        again = tokenize_file(
            shard.source,
            vocab_run / "tokenizer" / "tokenizer.json",
            tmp_path / "p" / Path(shard.source).name,
            len(tok),
            tok.bos_token_id,
            tok.eos_token_id,
            workers=2,
            chunk_bytes=16_384,
        )
        assert again.sha256 == shard.sha256 and again.tokens == shard.tokens
        assert again.documents == shard.documents > 0
    assert (tmp_path / "p" / "a.txt").stat().st_size == 2 * shards[0].tokens  # uint16: 2 bytes a token
    picked = blocks.select([5, 2, 7])
    assert np.array_equal(picked.read([0, 1, 2]), want[[5, 2, 7]])


def test_dtype_is_the_narrowest_that_holds_the_vocabulary(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    shard = tokenize_file(
        small_corpus["valid"],
        vocab_run / "tokenizer" / "tokenizer.json",
        tmp_path / "wide.bin",
        70_000,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert shard.dtype == "uint32" and (tmp_path / "wide.bin").stat().st_size == 4 * shard.tokens
    with pytest.raises(InputError, match="not below the vocabulary size 100"):
        tokenize_file(small_corpus["valid"], vocab_run / "tokenizer" / "tokenizer.json", tmp_path / "x.bin", 100, 1, 2)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.json").exists()
    with pytest.raises(InputError, match="id .* is not below the vocabulary size 100"):
        check_shards([shard], 100)


def test_editing_one_file_retokenizes_only_that_file(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    files = two_files(tmp_path, small_corpus)
    cache = tmp_path / "cache"
    _, first = shards_of(files, vocab_run, tok, cache)
    _, again = shards_of(files, vocab_run, tok, cache)
    assert (first["shards_built"], again["shards_built"], again["cache"]) == (2, 0, "hit")
    files[1].write_text(files[1].read_text(encoding="utf-8") + "\n新加的一行。\n", encoding="utf-8")
    renamed = files[0].rename(tmp_path / "renamed.txt")  # a new name, the same content: still cached
    shards, edited = shards_of([renamed, files[1]], vocab_run, tok, cache)
    assert (edited["shards_cached"], edited["shards_built"]) == (1, 1)
    assert edited["cache_key"] != first["cache_key"]


def test_a_bad_line_deep_in_a_file_is_named_by_file_and_line(tmp_path: Path, vocab_run, tok) -> None:
    good = "今天天气很好，我们去公园散步。\n" * 3000
    path = tmp_path / "corpus_100.txt"
    path.write_bytes(good.encode() + b"\xff\xfe broken\n" + good.encode())
    with pytest.raises(InputError, match=r"corpus_100\.txt:3001: not UTF-8 \(byte 0xff at column 1\)"):
        tokenize_file(
            path,
            vocab_run / "tokenizer" / "tokenizer.json",
            tmp_path / "s.bin",
            len(tok),
            1,
            2,
            workers=2,
            chunk_bytes=8192,
        )
    assert not list(tmp_path.glob("s.bin*")) and not list(tmp_path.glob(".s.bin*"))


def test_empty_files_are_skipped_and_an_empty_corpus_fails(
    tmp_path: Path, vocab_run, tok, small_corpus, caplog
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="zhllama.core.token_shards"):
        shards, _ = shards_of([empty, small_corpus["valid"]], vocab_run, tok, tmp_path / "c")
    assert len(shards) == 1 and "empty.txt: no non-blank lines: skipped" in caplog.text
    with pytest.raises(InputError, match="corpus is empty"):
        shards_of([empty, empty], vocab_run, tok, tmp_path / "c")


def test_truncated_or_corrupt_shards_are_rebuilt_never_read(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    cache = tmp_path / "cache"
    (shard,), _ = shards_of([small_corpus["valid"]], vocab_run, tok, cache)
    whole = shard.path.read_bytes()
    shard.path.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (again,), info = shards_of([small_corpus["valid"]], vocab_run, tok, cache)
    assert info["shards_built"] == 1 and again.path.read_bytes() == whole
    flipped = bytearray(whole)
    flipped[100] ^= 0xFF  # same size, one byte different
    shard.path.write_bytes(bytes(flipped))
    (again,), info = shards_of([small_corpus["valid"]], vocab_run, tok, cache)
    assert info["shards_built"] == 1 and again.path.read_bytes() == whole
    _, info = shards_of([small_corpus["valid"]], vocab_run, tok, cache)
    assert info["shards_built"] == 0


PEAK = """
import sys
from pathlib import Path
from zhllama.core.token_shards import tokenize_file
tokenize_file(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), 1, 2, workers=2, chunk_bytes=1 << 18)
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024)
"""


def test_memory_stays_flat_as_the_corpus_grows(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    text = small_corpus["train"].read_bytes()
    peaks = {}
    for factor in (1, 8):
        corpus = tmp_path / f"x{factor}.txt"
        corpus.write_bytes(text * factor)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK,
                str(corpus),
                str(vocab_run / "tokenizer" / "tokenizer.json"),
                str(tmp_path / f"x{factor}.bin"),
                str(len(tok)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[factor] = int(done.stdout.split()[-1])
    assert peaks[8] < peaks[1] + 16, f"peak RSS grew with the corpus: {peaks} MB (corpus {len(text) / 2**20:.1f} MB x1)"


def test_shard_folders_hand_off_in_name_order_and_checked(tmp_path: Path, vocab_run, tok, small_corpus) -> None:
    """The pipeline's fan-out: one folder per corpus file (the tokenize launcher), handed to PT
    in the order of the files' names whatever order the tasks finished in, each verified."""
    from types import SimpleNamespace

    from zhllama.core.token_shards import read_shard_dirs
    from zhllama.recipes.chinese_llama_alpaca import launchers

    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    a, b = two_files(tmp_path, small_corpus)
    (data / "corpus" / "a.txt").write_bytes(a.read_bytes())
    (data / "corpus" / "b.txt").write_bytes(b.read_bytes())
    (data / "zhllama_data.json").write_text('{"md5": "abc.dir"}', encoding="utf-8")
    vocab = SimpleNamespace(path=str(vocab_run))
    outs = {}
    for name in ("corpus/b.txt", "corpus/a.txt"):  # finished in the "wrong" order
        shard = SimpleNamespace(path=str(tmp_path / name.replace("/", "_")), metadata={})
        launchers.tokenize(SimpleNamespace(path=str(data)), vocab, shard, corpus_file=name)
        assert shard.metadata["tokens"] > 0 and (Path(shard.path) / "zhllama_data.json").is_file()
        outs[name] = shard.path
    shards = read_shard_dirs(list(outs.values()), len(tok))
    assert [s.name for s in shards] == ["corpus/a.txt", "corpus/b.txt"]
    blocks = TokenBlocks(shards, 64)
    assert np.array_equal(blocks.read(range(len(blocks))), in_memory_blocks([a, b], tok, 64))
    with pytest.raises(InputError, match="not a file inside the data set"):
        launchers.tokenize(
            SimpleNamespace(path=str(data)),
            vocab,
            SimpleNamespace(path=str(tmp_path / "x"), metadata={}),
            corpus_file="../a.txt",
        )
    with pytest.raises(InputError, match="name one corpus file twice"):
        read_shard_dirs([outs["corpus/a.txt"], outs["corpus/a.txt"]], len(tok))
    with pytest.raises(InputError, match="not below the vocabulary size"):
        read_shard_dirs(list(outs.values()), 300)
    bad = Path(outs["corpus/a.txt"]) / "shard.bin"
    raw = bytearray(bad.read_bytes())
    raw[10] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a whole token shard"):
        read_shard_dirs(list(outs.values()), len(tok))


def test_a_bad_line_in_the_hundredth_file_names_that_file(tmp_path: Path, vocab_run, tok, caplog) -> None:
    files = []
    for k in range(1, 101):
        path = tmp_path / f"part-{k:03d}.txt"
        path.write_text(f"第{k}份：今天天气很好。\n" * 5, encoding="utf-8")
        files.append(path)
    files[-1].write_bytes("第一行。\n第二行。\n".encode() + b"\xc3\x28 bad\n")
    with pytest.raises(InputError, match=r"part-100\.txt:3: not UTF-8 \(byte 0xc3 at column 1\)"):
        shards_of(files, vocab_run, tok, tmp_path / "cache", workers=1)
    # the 99 good shards were cached on the way; a fixed file re-tokenizes only itself
    files[-1].write_text("第一行。\n", encoding="utf-8")
    shards, info = shards_of(files, vocab_run, tok, tmp_path / "cache", workers=1)
    assert len(shards) == 100 and (info["shards_cached"], info["shards_built"]) == (99, 1)
