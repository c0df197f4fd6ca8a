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
