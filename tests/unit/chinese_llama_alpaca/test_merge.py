from pathlib import Path

import pytest
import torch

from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer


def _batch(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (3, 24), generator=gen)


def test_merged_logits_equal_the_peft_model(tiny_base: Path, pt_run: Path, pt_merged: Path) -> None:
    from peft import PeftModel

    model = load_model(tiny_base)
    tokenizer = load_tokenizer(pt_run / "tokenizer")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = PeftModel.from_pretrained(model, str(pt_run / "adapter")).eval()
    merged = load_model(pt_merged).eval()
    ids = _batch(len(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=0)
    assert not [n for n, _ in merged.named_modules() if "lora" in n], "adapter layers left in the merged model"
    assert merged.config.vocab_size == len(tokenizer) == len(load_tokenizer(pt_merged))
    assert (pt_merged / "tokenizer.model").is_file()


def test_low_memory_mode_gives_the_same_weights(tmp_path: Path, tiny_base: Path, pt_run: Path, pt_merged: Path) -> None:
    merge_adapters(tiny_base, [pt_run], tmp_path / "low", low_memory=True)
    a, b = load_model(pt_merged).state_dict(), load_model(tmp_path / "low").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_a_second_merge_is_refused(tmp_path: Path, pt_run: Path, pt_merged: Path, tiny_base: Path) -> None:
    with pytest.raises(InputError, match="already merged"):
        merge_adapters(pt_merged, [pt_run], tmp_path / "twice")
    with pytest.raises(InputError, match="already merged"):
        merge_adapters(tiny_base, [pt_run, pt_run], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_missing_adapter_and_wrong_tokenizer(tmp_path: Path, tiny_base: Path, pt_run: Path) -> None:
    with pytest.raises(InputError, match="no LoRA adapter"):
        merge_adapters(tiny_base, [tmp_path], tmp_path / "out")
    with pytest.raises(InputError, match="tokenizer has 32000 tokens but the last adapter's embeddings have"):
        merge_adapters(tiny_base, [pt_run], tmp_path / "out", tokenizer_dir=tiny_base)
