"""Scores base, PT-merged and final models (and the base-vocabulary PT, when given) on the held-out
splits; the report renders in the Kubeflow UI.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGE_CPU


def evaluate(
    data: Input[Dataset],
    base_model: Input[Model],
    pt_merged: Input[Model],
    final: Input[Model],
    vocab: Input[Model],
    pt_run: Input[Model],
    sft_run: Input[Model],
    evaluation: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    lm_max_lines: int = 200,
    lm_chunk_chars: int = 256,
    batch_size: int = 8,
    task_max_examples: int = 200,
    task_options: list = [],
    task_max_new_tokens: int = 8,
    task_greedy_max_examples: int = 0,
    sample_prompts: list = ["请用一句话介绍北京。", "中国的首都是哪里？", "写一句关于春天的诗。", "判断下面这条评论的情感倾向，只回答“正面”或“负面”。\n质量很好，非常满意，下次还会再买。", "判断下面这条评论的情感倾向，只回答“正面”或“负面”。\n物流太慢了，包装也破了，很失望。"],
    max_new_tokens: int = 64,
    seed: int = 0,
    num_threads: int = 0,
    mcq_dir: str = "",
    mcq_split: str = "auto",
    mcq_shots: int = 5,
    mcq_max_per_subject: int = 0,
    pt_base_vocab: Input[Model] = None,
) -> None:
    """Scores base, PT-merged and final models (and the base-vocabulary PT, when given) on the held-out
    splits; the report renders in the Kubeflow UI."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import EvalConfig

    config = EvalConfig(
        lm_max_lines=lm_max_lines,
        lm_chunk_chars=lm_chunk_chars,
        batch_size=batch_size,
        task_max_examples=task_max_examples,
        task_options=task_options,
        task_max_new_tokens=task_max_new_tokens,
        task_greedy_max_examples=task_greedy_max_examples,
        sample_prompts=sample_prompts,
        max_new_tokens=max_new_tokens,
        seed=seed,
        num_threads=num_threads,
        mcq_dir=mcq_dir,
        mcq_split=mcq_split,
        mcq_shots=mcq_shots,
        mcq_max_per_subject=mcq_max_per_subject,
    )
    launchers.evaluate(
        data,
        base_model,
        pt_merged,
        final,
        vocab,
        pt_run,
        sft_run,
        evaluation,
        report,
        metrics,
        config,
        pt_base_vocab=pt_base_vocab,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


evaluate_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(evaluate)
