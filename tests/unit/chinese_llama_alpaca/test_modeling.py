from pathlib import Path

import pytest
import torch

from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.modeling import (
    check_model_dir,
    check_vocab,
    load_model,
    load_tokenizer,
    resize_embeddings,
)


def test_new_row_is_the_mean_of_its_base_pieces(tiny_base: Path, vocab_run: Path) -> None:
    model, base_tok = load_model(tiny_base), load_tokenizer(tiny_base)
    merged = load_tokenizer(vocab_run / "tokenizer")
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = resize_embeddings(model, merged, base_tok)
    assert info["new"] == len(merged) and info["initialised_from_pieces"] > 0
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(new_in[: len(base_tok)], old_in), "old rows must stay put"
    checked = 0
    for token_id in (len(base_tok), len(base_tok) + 7, len(merged) - 1):
        piece = merged.convert_ids_to_tokens(token_id)
        ids = [t.id for t in base_tok.backend_tokenizer.model.tokenize(piece)]
        assert len(ids) >= 1
        torch.testing.assert_close(new_in[token_id], old_in[ids].mean(0))
        torch.testing.assert_close(new_out[token_id], old_out[ids].mean(0))
        checked += 1
    assert model.config.vocab_size == len(merged)
    assert checked == 3


def test_default_init_option(tiny_base: Path, vocab_run: Path) -> None:
    model, base_tok = load_model(tiny_base), load_tokenizer(tiny_base)
    info = resize_embeddings(model, load_tokenizer(vocab_run / "tokenizer"), base_tok, init="default")
    assert info["initialised_from_pieces"] == 0


def test_mean_init_option(tiny_base: Path, vocab_run: Path) -> None:
    model = load_model(tiny_base)
    old_in, old_out = (
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    )
    resize_embeddings(model, load_tokenizer(vocab_run / "tokenizer"), load_tokenizer(tiny_base), init="mean")
    rows = old_in.shape[0]
    new_in, new_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_in[:rows], old_in)
    torch.testing.assert_close(new_in[rows:], old_in.mean(0).expand_as(new_in[rows:]))
    torch.testing.assert_close(new_out[rows:], old_out.mean(0).expand_as(new_out[rows:]))


def test_tokenizer_that_does_not_fit_is_named(tiny_base: Path, vocab_run: Path) -> None:
    model = load_model(tiny_base)
    merged = load_tokenizer(vocab_run / "tokenizer")
    with pytest.raises(InputError, match=r"tokenizer has \d+ tokens but the model's embeddings have 32000 rows"):
        check_vocab(model, merged, "here")
    check_vocab(model, merged, "here", allow_grow=True)
    resize_embeddings(model, merged, load_tokenizer(tiny_base))
    with pytest.raises(InputError, match="fewer than the model"):
        resize_embeddings(model, load_tokenizer(tiny_base))


def test_model_dir_without_weights(tmp_path: Path, tiny_base: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_base / "config.json").read_text())
    with pytest.raises(InputError, match="no weights"):
        check_model_dir(tmp_path)
    with pytest.raises(InputError, match="not found"):
        check_model_dir(tmp_path / "nope")
