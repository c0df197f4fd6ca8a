"""A new registered version with alias challenger; champion moves only when the gate passes (and, with
register_smoke_test, after serve_smoke).

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.images import IMAGE_CPU


def register(
    final: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    model_name: str = "zhllama-chinese-alpaca",
    promotion_metrics: list = ["sft_test_loss:min", "task_accuracy_loglik:max"],
    min_improvement: float = 0.0,
    max_regression: float = 0.01,
    floor: bool = True,
    floor_thresholds: list = ["task_accuracy_loglik>=0.6"],
    floor_margin_over_majority: float = 0.1,
    lock_timeout: float = 120.0,
    smoke_test: bool = True,
) -> str:
    """A new registered version with alias challenger; champion moves only when the gate passes (and, with
    register_smoke_test, after serve_smoke)."""
    from zhllama.core.config import RegisterConfig
    from zhllama.recipes.chinese_llama_alpaca import launchers

    config = RegisterConfig(
        model_name=model_name,
        promotion_metrics=promotion_metrics,
        min_improvement=min_improvement,
        max_regression=max_regression,
        floor=floor,
        floor_thresholds=floor_thresholds,
        floor_margin_over_majority=floor_margin_over_majority,
        lock_timeout=lock_timeout,
        smoke_test=smoke_test,
    )
    return launchers.register(
        final,
        evaluation,
        registration,
        metrics,
        config,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


register_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(register)
