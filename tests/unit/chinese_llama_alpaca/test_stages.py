"""The recipe's one stage table: every stage, config, component, CLI command and metric in it."""

import dataclasses
import inspect

from zhllama.cli import STAGE_COMMANDS, build_parser
from zhllama.core import registry
from zhllama.core.config import RegisterConfig, parse_promotion_metric
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca import configs, launchers
from zhllama.recipes.chinese_llama_alpaca.evaluate import summary_metrics
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE, promotion_metrics


def test_every_config_dataclass_is_one_stage_of_the_table() -> None:
    stage_configs = [cls for cls in vars(configs).values() if inspect.isclass(cls) and cls.__name__.endswith("Config")]
    in_table = [stage.config for stage in RECIPE.configured()]
    assert sorted(c.__name__ for c in stage_configs) == sorted(c.__name__ for c in in_table)
    assert len({s.prefix for s in RECIPE.configured()}) == len(in_table)  # prefixes and sections unique
    assert len({s.section for s in RECIPE.configured()}) == len(in_table)


def test_every_stage_has_a_component_a_launcher_and_a_command() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # argparse keeps them there
    for stage in RECIPE.stages:
        assert (PROJECT_ROOT / "components" / f"{stage.name}.py").is_file(), stage.name
        assert callable(getattr(launchers, stage.name)), stage.name
        if stage.config is not None:
            assert stage.name in commands and stage.name in STAGE_COMMANDS, stage.name
    assert set(STAGE_COMMANDS) == {s.name for s in RECIPE.configured()}


def test_the_promotion_metrics_are_what_evaluation_produces() -> None:
    scores = {"bits_per_char": 1.0, "bits_per_byte": 0.5, "token_perplexity": 3.0, "tokens_per_char": 0.6}
    result = {
        "language_model": {role: scores for role in ("base", "pt_base_vocab", "pt_merged", "final")},
        "task": {"accuracy_loglik": 0.5, "exact_match": 0.5, "test_loss": 1.0, "majority_share": 0.5},
        "sft_valid_loss": 1.0,
        "pt_valid_loss": 2.0,
        "tokenizer": {"base": {"tokens_per_chinese_char": 1.7}, "merged": {"tokens_per_chinese_char": 0.7}},
    }
    assert set(summary_metrics(result)) == set(promotion_metrics())
    # evaluation produces these, so the gate takes them
    assert {"pt_valid_loss", "final_bits_per_byte"} <= set(promotion_metrics())
    for spec in RegisterConfig().promotion_metrics:
        name, direction = parse_promotion_metric(spec)
        assert promotion_metrics()[name].direction == direction
    assert set(registry.floor_metrics(RegisterConfig())) <= set(promotion_metrics())  # the floor reads them too


def test_run_parameters_do_not_shadow_stage_parameters() -> None:
    names = [name for name, _, _ in RECIPE.pipeline_parameters()]
    assert len(names) == len(set(names))
    assert all(dataclasses.is_dataclass(stage.config) for stage in RECIPE.configured())
