"""Chinese SentencePiece (BPE) on the corpus, appended to the base model's tokenizer; ids of the base
stay put.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE_CPU


def vocab(
    data: Input[Dataset],
    base_model: Input[Model],
    tokenizer: Output[Model],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    vocab_size: int = 20000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2000000,
    shuffle_input_sentence: bool = True,
    max_sentence_length: int = 16384,
    num_threads: int = 2,
    byte_fallback: bool = False,
    normalization_rule_name: str = "identity",
    split_digits: bool = True,
    new_piece_score: str = "descending",
    seed: int = 42,
    bpe_new_tokens: int = 16000,
    bpe_min_frequency: int = 2,
) -> None:
    """Chinese SentencePiece (BPE) on the corpus, appended to the base model's tokenizer; ids of the base
    stay put."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import VocabConfig

    config = VocabConfig(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=shuffle_input_sentence,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        byte_fallback=byte_fallback,
        normalization_rule_name=normalization_rule_name,
        split_digits=split_digits,
        new_piece_score=new_piece_score,
        seed=seed,
        bpe_new_tokens=bpe_new_tokens,
        bpe_min_frequency=bpe_min_frequency,
    )
    launchers.vocab(
        data,
        base_model,
        tokenizer,
        metrics,
        config,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


vocab_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(vocab)
