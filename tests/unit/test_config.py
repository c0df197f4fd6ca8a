from pathlib import Path

import pytest

from zhllama import config as config_module
from zhllama.config import PRESET_SECTIONS, VocabConfig, build_config
from zhllama.io import InputError
from zhllama.settings import PROJECT_ROOT

PRESETS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset: Path) -> None:
    header = preset.read_text().splitlines()[:3]
    assert any("Launch" in line for line in header), f"{preset.name}: the header must say how to launch it"
    for name in PRESET_SECTIONS:
        build_config(getattr(config_module, name), preset)


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


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown VocabConfig key.*vocab_sise"):
        build_config(VocabConfig, overrides={"vocab_sise": 100})
    preset = tmp_path / "p.yaml"
    preset.write_text("vocabulary:\n  vocab_size: 10\n")
    with pytest.raises(InputError, match="unknown section"):
        build_config(VocabConfig, preset)


def test_overrides_beat_preset(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("vocab:\n  vocab_size: 1234\n  model_type: unigram\n")
    cfg = build_config(VocabConfig, preset, {"vocab_size": 999, "model_type": None})
    assert (cfg.vocab_size, cfg.model_type) == (999, "unigram")
