from pathlib import Path

import pytest

from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.corpus import check_corpus, count_chinese_chars, read_corpus


def test_reads_non_blank_lines(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("第一行\n\n  \n第二行\r\n", encoding="utf-8")
    assert read_corpus([corpus]) == ["第一行", "第二行"]


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    corpus = tmp_path / "gbk.txt"
    corpus.write_bytes("好的\n".encode() + "中文".encode("gbk") + b"\n")
    with pytest.raises(InputError, match=r"gbk\.txt:2: not UTF-8"):
        check_corpus([corpus])


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.txt: corpus is empty"):
        check_corpus([corpus])


def test_missing_corpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        check_corpus([tmp_path / "nope.txt"])


def test_count_chinese_chars() -> None:
    assert count_chinese_chars("迈向 new 世纪，１９９８") == 4
