"""A Hugging Face LLaMA-family model directory with its SentencePiece tokenizer: a copy of
base_model_uri, or the embedded tiny random LLaMA.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import IMAGE_CPU


def base(
    model: Output[Model],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    base_model_uri: str = "",
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 42,
) -> None:
    """A Hugging Face LLaMA-family model directory with its SentencePiece tokenizer: a copy of
    base_model_uri, or the embedded tiny random LLaMA."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import BaseModelConfig

    config = BaseModelConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
    )
    launchers.base(
        model,
        config,
        base_model_uri=base_model_uri,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


base_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(base)
