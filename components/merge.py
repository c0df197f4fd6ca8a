"""base + adapter -> a whole Hugging Face model (logits equal the adapter model's); a second merge is
refused.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import IMAGE_CPU


def merge(
    base_model: Input[Model],
    adapter_run: Input[Model],
    merged: Output[Model],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    stage_name: str = "merge",
    base_model_subdir: str = "",
    low_memory: bool = False,
    max_shard_size: str = "2GB",
) -> None:
    """base + adapter -> a whole Hugging Face model (logits equal the adapter model's); a second merge is
    refused."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import MergeConfig

    config = MergeConfig(
        low_memory=low_memory,
        max_shard_size=max_shard_size,
    )
    launchers.merge(
        base_model,
        adapter_run,
        merged,
        config,
        stage_name=stage_name,
        base_model_subdir=base_model_subdir,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


merge_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(merge)
