"""One corpus file of the data set into a token shard (ids in the narrowest dtype, a sidecar with
counts and sha256) with the vocab stage's tokenizer: one task of the fan-out that feeds pretraining.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import IMAGE_CPU


def tokenize(
    data: Input[Dataset],
    vocab: Input[Model],
    shard: Output[Dataset],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    corpus_file: str = "corpus/train.txt",
    vocab_subdir: str = "tokenizer",
) -> None:
    """One corpus file of the data set into a token shard (ids in the narrowest dtype, a sidecar with
    counts and sha256) with the vocab stage's tokenizer: one task of the fan-out that feeds pretraining."""
    from zhllama.recipes.chinese_llama_alpaca import launchers

    launchers.tokenize(
        data,
        vocab,
        shard,
        corpus_file=corpus_file,
        vocab_subdir=vocab_subdir,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


tokenize_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(tokenize)
