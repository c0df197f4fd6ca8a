"""Pretrain on the corpus with the merged tokenizer; the run directory holds adapter/ (stage 2) or
model/ (stage 1).

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE_CPU, IMAGE_CUDA


def pretrain(
    base_model: Input[Model],
    vocab: Input[Model],
    shards: Input[list[Dataset]],
    run: Output[Model],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    nproc_per_node: int = 1,
    nnodes: int = 1,
    checkpoint_uri: str = "",
    checkpoint_run: str = "",
    checkpoint_task: str = "",
    train_launcher: str = "in_pod",
    trainjob_image: str = "",
    trainjob_resources: str = "",
    base_model_subdir: str = "",
    vocab_subdir: str = "tokenizer",
    stage_name: str = "",
    learning_rate: float = 0.0002,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    max_grad_norm: float = 1.0,
    per_device_train_batch_size: int = 4,
    per_device_eval_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_steps: int = 100,
    num_train_epochs: float = 1.0,
    seed: int = 42,
    logging_steps: int = 10,
    eval_steps: int = 50,
    save_steps: int = 50,
    save_total_limit: int = 2,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    num_threads: int = 0,
    lora_rank: int = 8,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_target_modules: list = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    modules_to_save: list = ["embed_tokens", "lm_head"],
    modules_to_save_learning_rate: float = 0.0,
    tied_embeddings: str = "keep",
    stage: int = 2,
    block_size: int = 512,
    validation_split_percentage: float = 1.0,
    init_new_embeddings: str = "mean_of_pieces",
    max_eval_blocks: int = 64,
    stage1_new_rows_only: bool = False,
) -> None:
    """Pretrain on the corpus with the merged tokenizer; the run directory holds adapter/ (stage 2) or
    model/ (stage 1)."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig

    config = PretrainConfig(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        seed=seed,
        logging_steps=logging_steps,
        eval_steps=eval_steps,
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        num_threads=num_threads,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules,
        modules_to_save=modules_to_save,
        modules_to_save_learning_rate=modules_to_save_learning_rate,
        tied_embeddings=tied_embeddings,
        stage=stage,
        block_size=block_size,
        validation_split_percentage=validation_split_percentage,
        init_new_embeddings=init_new_embeddings,
        max_eval_blocks=max_eval_blocks,
        stage1_new_rows_only=stage1_new_rows_only,
    )
    launchers.pretrain(
        base_model,
        vocab,
        shards,
        run,
        metrics,
        config,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        checkpoint_uri=checkpoint_uri,
        checkpoint_run=checkpoint_run,
        checkpoint_task=checkpoint_task,
        train_launcher=train_launcher,
        trainjob_image=trainjob_image,
        trainjob_resources=trainjob_resources,
        base_model_subdir=base_model_subdir,
        vocab_subdir=vocab_subdir,
        stage_name=stage_name,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


pretrain_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(pretrain)
pretrain_gpu = dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)(pretrain)
