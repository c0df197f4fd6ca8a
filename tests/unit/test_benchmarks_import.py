"""Every benchmark module imports against the current library (make bench is not in make test:
a stale import there went unnoticed once)."""

import importlib
from pathlib import Path

import pytest

MODULES = sorted(
    p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name: str) -> None:
    importlib.import_module(f"benchmarks.{name}")


def test_train_one_builds_its_configs() -> None:
    from benchmarks import train_one
    from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

    cfg = RECIPE.stage_config("pretrain", train_one.PRESET, {"max_steps": 2, "block_size": 256})
    assert (cfg.max_steps, cfg.block_size) == (2, 256)


def test_isa_switch_holds_every_library_to_avx2() -> None:
    """--isa avx2 stands for a CPU without AVX512: a process started with its switches must
    dispatch torch's own kernels and MKL's GEMM to AVX2 (MKL_VERBOSE names the code path)."""
    import os
    import subprocess
    import sys

    from benchmarks.bench import ISA_ENV

    code = "import torch; a = torch.ones(64, 64); a @ a; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, **ISA_ENV["avx2"], "MKL_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "AVX2"
    # MKL's header names the code path on Intel ("... Intel(R) AVX2 enabled processors") and
    # none on AMD ("... Intel(R) Architecture processors"): either way never AVX-512.
    mkl = [line for line in done.stdout.splitlines() if line.startswith("MKL_VERBOSE oneMKL")]
    assert not mkl or "AVX-512" not in mkl[0] and ("Vector Extensions" not in mkl[0] or "AVX2" in mkl[0]), mkl


def test_scaled_corpora_are_deterministic_copies(tmp_path) -> None:
    """data_scale's 10x corpus: ten copies of the default lines, each seeded, the same every time."""
    from pathlib import Path

    from benchmarks.data_scale import SHARED_NOVEL, build_corpus

    default = tmp_path / "train.txt"
    default.write_text("".join(f"第{i}行。\n" for i in range(50)), encoding="utf-8")
    a = build_corpus(default, 10, tmp_path / "a.txt")
    b = build_corpus(default, 10, tmp_path / "b.txt")
    text = Path(a["path"]).read_text(encoding="utf-8")
    assert text == Path(b["path"]).read_text(encoding="utf-8")
    lines = text.splitlines()
    novel = len(SHARED_NOVEL.read_text(encoding="utf-8").splitlines()) if SHARED_NOVEL.is_file() else 0
    assert len(lines) == 500 + novel and lines[:50] == default.read_text(encoding="utf-8").splitlines()
    assert lines[50:100] != lines[:50] and sorted(lines[50:100]) == sorted(lines[:50])


def test_roofline_counts_the_default_models_arithmetic() -> None:
    """The PT step's matmul FLOPs a token for the tiny default (hidden 256, 4 layers, MLP 688,
    merged vocabulary 51,357, block 512): the output layer's three products are 6·V·h of it, and
    the ceiling over the recipe is the limit's tokens/s over the recipe's."""
    from benchmarks.roofline import render_roofline, roofline, train_flops_per_token

    config = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_hidden_layers": 4}
    per_token = train_flops_per_token(config, 51357, 512)
    assert per_token == 97_824_256
    assert 6 * 51357 * 256 / per_token > 0.8  # the output layer is over 80% of the work
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
    r = roofline(small, 100, 16, 2, {"zhllama": 1000.0, "recipe": 500.0})
    assert r["ceiling_over_recipe"] == r["ceiling_tokens_per_second"] / 500.0
    assert r["runs"]["zhllama"]["share"] == 2 * r["runs"]["recipe"]["share"] > 0
    assert "x the recipe" in render_roofline(r)


def test_probe_reads_every_layer_of_a_model(pt_merged, tiny_sft_data) -> None:
    """benchmarks.probe: held-out accuracy of a linear probe at the embeddings, middle and last
    layer, on the model's own tokenizer, with the majority share it is read against."""
    from benchmarks.probe import probe

    result = probe(pt_merged, pt_merged, tiny_sft_data["train"].parent, train_n=64, test_n=16, max_tokens=64)
    assert set(result["layers"]) == {"0", "1", "2"}  # the tiny model's 2 layers: embeddings, middle, last
    assert all(0.0 <= acc <= 1.0 for acc in result["layers"].values())
    assert (result["train"], result["test"]) == (64, 16)
    assert 0.5 <= result["majority_share"] <= 1.0
    assert result["tokens_per_char"] > 0
