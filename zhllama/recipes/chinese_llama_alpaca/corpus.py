"""Reading and checking the text inputs of every stage.

Each reader raises ``InputError`` naming the file and the line on bad input, before any
output is written.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError

# The files a data folder holds (data/ in the checkout, the data step's Dataset artifact).
CORPUS_FILES = ("corpus/train.txt", "corpus/valid.txt", "corpus/test.txt")
SFT_FILES = ("sft/train.json", "sft/valid.json", "sft/test.json")

# CJK Unified Ideographs (+ extension A and compatibility ideographs): what "a Chinese character" means here.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def count_chinese_chars(text: str) -> int:
    return len(_CJK.findall(text))


def decode_line(path: Path, lineno: int, raw: bytes) -> str:
    """One raw line as text; not UTF-8: the error names the file, line, byte and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "convert the file to UTF-8"
        ) from None


def iter_corpus_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the non-blank lines of a UTF-8 plain-text corpus (one document per line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: corpus file not found")
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = decode_line(path, lineno, raw)
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def line_index(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], array, array]:
    """Where every non-blank line of the corpus starts: (files, file number per line, byte
    offset per line), 10 bytes a line in two compact arrays (never the text: a 20 GB corpus
    indexes in ~0.1 GB). Checks the files as ``iter_corpus_lines`` does."""
    files = [Path(p) for p in paths]
    which, offsets = array("h"), array("q")
    for number, path in enumerate(files):
        if not path.is_file():
            raise InputError(f"{path}: corpus file not found")
        with open(path, "rb") as handle:
            offset = 0
            for lineno, raw in enumerate(handle, start=1):
                line = decode_line(path, lineno, raw)
                if line.strip():
                    which.append(number)
                    offsets.append(offset)
                offset += len(raw)
    return files, which, offsets


def read_line(path: Path, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.readline().decode("utf-8").rstrip("\r\n")


def check_corpus(paths: Sequence[str | os.PathLike[str]]) -> dict[str, int]:
    """Validate corpus files (exist, UTF-8, not empty); return line and character counts."""
    if not paths:
        raise InputError("no corpus files given")
    lines = chars = 0
    for path in paths:
        file_lines = 0
        for line in iter_corpus_lines(path):
            file_lines += 1
            chars += len(line)
        if file_lines == 0:
            raise InputError(f"{path}: corpus is empty (no non-blank lines)")
        lines += file_lines
    return {"lines": lines, "chars": chars}


def read_corpus(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    check_corpus(paths)
    return [line for path in paths for line in iter_corpus_lines(path)]


def validate_data(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Every corpus file UTF-8 and non-empty, every instruction file well-formed."""
    from zhllama.recipes.chinese_llama_alpaca.sft import read_alpaca

    root = Path(folder)
    missing = [name for name in (*CORPUS_FILES, *SFT_FILES) if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root}: missing {', '.join(missing)}")
    report: dict[str, Any] = {"corpus": {}, "sft": {}}
    for name in CORPUS_FILES:
        report["corpus"][Path(name).stem] = check_corpus([root / name])
    for name in SFT_FILES:
        report["sft"][Path(name).stem] = {"examples": len(read_alpaca(root / name))}
    return report
