"""Deploy-then-promote: serves the challenger the gate let win from the registry (MLflow's scoring
server), sends the sample prompts and task items, and moves champion only when every answer passed.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from components.images import IMAGE_CPU


def serve_smoke(
    registration: Input[Artifact],
    evaluation: Input[Artifact],
    smoke: Output[Artifact],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    task_items: int = 3,
    max_new_tokens: int = 16,
    answer_timeout: float = 60.0,
    start_timeout: float = 600.0,
) -> str:
    """Deploy-then-promote: serves the challenger the gate let win from the registry (MLflow's scoring
    server), sends the sample prompts and task items, and moves champion only when every answer passed."""
    from zhllama.core.config import SmokeConfig
    from zhllama.recipes.chinese_llama_alpaca import launchers

    config = SmokeConfig(
        task_items=task_items,
        max_new_tokens=max_new_tokens,
        answer_timeout=answer_timeout,
        start_timeout=start_timeout,
    )
    return launchers.serve_smoke(
        registration,
        evaluation,
        smoke,
        metrics,
        config,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


serve_smoke_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(serve_smoke)
