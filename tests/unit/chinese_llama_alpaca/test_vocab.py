import json
from pathlib import Path

import pytest
import sentencepiece as spm

from tests.conftest import shared_file
from zhllama import cli
from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.configs import VocabConfig
from zhllama.recipes.chinese_llama_alpaca.vocab import (
    HF_TOKENIZER_DIR,
    MERGED_SP_MODEL,
    METRICS_FILE,
    add_pad_token,
    fallback_base_tokenizer,
    merge_tokenizers,
    resolve_base_tokenizer,
    run_vocab,
    tokenizer_stats,
)


def test_merge_keeps_base_ids_and_appends(vocab_run: Path) -> None:
    metrics = json.loads((vocab_run / METRICS_FILE).read_text())
    base = spm.SentencePieceProcessor(model_file=metrics["base_tokenizer"])
    merged = spm.SentencePieceProcessor(model_file=str(vocab_run / MERGED_SP_MODEL))
    n = base.get_piece_size()
    assert merged.get_piece_size() == n + metrics["pieces_added"] == metrics["merged_vocab_size"]
    assert metrics["pieces_added"] > 1000
    for i in range(n):
        assert merged.id_to_piece(i) == base.id_to_piece(i)
        assert merged.get_score(i) == base.get_score(i)
    new_pieces = {merged.id_to_piece(i) for i in range(n, merged.get_piece_size())}
    assert not new_pieces & {base.id_to_piece(i) for i in range(n)}, "a piece was appended twice"


def test_hf_tokenizer_loads_offline_and_agrees(vocab_run: Path, small_corpus) -> None:
    from transformers import AutoTokenizer

    tokenizer_dir = vocab_run / HF_TOKENIZER_DIR
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    slow = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert len(tokenizer) == slow.get_piece_size()
    texts = small_corpus["valid"].read_text(encoding="utf-8").splitlines()[:200]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert ids[1:] == slow.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    metrics = json.loads((vocab_run / METRICS_FILE).read_text())
    assert metrics["fast_slow_agreement"] == 1.0


def test_metrics_show_the_gain(vocab_run: Path) -> None:
    m = json.loads((vocab_run / METRICS_FILE).read_text())
    for key in ("base_vocab_size", "merged_vocab_size", "pieces_added", "train_seconds", "fast_slow_agreement"):
        assert key in m
    assert m["merged"]["tokens_per_chinese_char"] < 0.7 * m["base"]["tokens_per_chinese_char"]
    assert m["merged"]["round_trip_rate"] == pytest.approx(1.0)
    assert m["merged"]["unk_rate"] == 0.0


def test_pad_token_is_distinct(vocab_run: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(vocab_run / HF_TOKENIZER_DIR))
    before = len(tokenizer)
    pad_id = add_pad_token(tokenizer)
    assert len(tokenizer) == before + 1 and pad_id == before
    assert pad_id not in {tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id}
    assert add_pad_token(tokenizer) == pad_id, "a second call must not add another token"


def test_fallback_base_tokenizer_is_llama_like() -> None:
    path = fallback_base_tokenizer()
    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert processor.get_piece_size() == 32000
    stats = tokenizer_stats(path, ["迈向充满希望的新世纪，一九九八年新年讲话。"])
    assert stats["tokens_per_chinese_char"] > 1.2, (
        "the fallback must split Chinese into many (byte) tokens, as LLaMA's does"
    )


def test_base_tokenizer_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ZHLLAMA_BASE_TOKENIZER", raising=False)
    given = tmp_path / "given.model"
    given.write_bytes(fallback_base_tokenizer().read_bytes())
    assert resolve_base_tokenizer(given) == given
    monkeypatch.setenv("ZHLLAMA_BASE_TOKENIZER", str(given))
    assert resolve_base_tokenizer() == given
    with pytest.raises(InputError, match="not found"):
        resolve_base_tokenizer(tmp_path / "missing.model")


# --- bad input: one clear error naming the file, no output directory left behind --------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = [
    # (id, train corpus bytes, base tokenizer bytes or None for the real one, vocab_size, expected message)
    ("empty-corpus", b"\n\n", None, 500, r"train\.txt: corpus is empty"),
    ("non-utf8", "好\n".encode() + "坏".encode("gbk") + b"\n", None, 500, r"train\.txt:2: not UTF-8"),
    (
        "vocab-too-large",
        "春眠不觉晓处处闻啼鸟\n夜来风雨声花落知多少\n".encode(),
        None,
        5000,
        r"cannot support vocab_size=5000",
    ),
    (
        "base-not-sentencepiece",
        "你好世界\n".encode() * 50,
        b"this is not a model",
        100,
        r"base\.model: not a SentencePiece model",
    ),
]


@pytest.mark.parametrize(
    ("corpus", "base", "vocab_size", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_fails_cleanly(
    tmp_path: Path, corpus: bytes, base: bytes | None, vocab_size: int, message: str
) -> None:
    train = _write(tmp_path / "train.txt", corpus)
    valid = _write(tmp_path / "valid.txt", "你好，世界。\n".encode())
    base_path = _write(tmp_path / "base.model", base) if base is not None else None
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        run_vocab([train], [valid], out, VocabConfig(vocab_size=vocab_size, model_type="bpe"), base_tokenizer=base_path)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp output left behind"


def test_merge_refuses_a_non_model_chinese_file(tmp_path: Path) -> None:
    bogus = _write(tmp_path / "zh.model", b"\x00\x01garbage")
    with pytest.raises(InputError, match=r"zh\.model: not a SentencePiece model"):
        merge_tokenizers(fallback_base_tokenizer(), bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_error(tmp_path: Path, capsys) -> None:
    empty = _write(tmp_path / "empty.txt", b"")
    code = cli.main(["vocab", "--train", str(empty), "--valid", str(empty), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "empty.txt" in err[0]


# --- the published reference, with the real files ---------------------------------------------


@pytest.mark.shared
def test_reference_merge_reproduces_49953(tmp_path: Path, default_data: Path) -> None:
    from transformers import AutoTokenizer

    llama = shared_file("llama-tokenizer.model")
    chinese = shared_file("chinese_sp.model")
    alpaca = json.loads(shared_file("alpaca_zh_demo.json").read_text(encoding="utf-8"))
    info = merge_tokenizers(llama, chinese, tmp_path / "merged", new_piece_score="zero")  # the recipe, literally
    assert info["merged_vocab_size"] == 49953
    base = spm.SentencePieceProcessor(model_file=str(llama))
    merged = spm.SentencePieceProcessor(model_file=str(tmp_path / "merged" / MERGED_SP_MODEL))
    assert [merged.id_to_piece(i) for i in range(32000)] == [base.id_to_piece(i) for i in range(32000)]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged" / HF_TOKENIZER_DIR))
    assert len(tokenizer) == 49953
    add_pad_token(tokenizer)
    assert len(tokenizer) == 49954
    # Modern Chinese: People's Daily (the default validation text) and alpaca_zh answers.
    # (On 红楼梦's classical prose the ratio is 0.54, as the data README's figures also show.)
    for name, lines in {
        "people's daily": (default_data / "corpus" / "valid.txt").read_text(encoding="utf-8").splitlines(),
        "alpaca_zh_demo": [r["output"] for r in alpaca],
    }.items():
        merged_tokens = sum(map(len, merged.encode(lines)))
        base_tokens = sum(map(len, base.encode(lines)))
        assert merged_tokens * 2 <= base_tokens, f"{name}: {merged_tokens} vs {base_tokens}"
