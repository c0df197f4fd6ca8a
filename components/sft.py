"""SFT from the PT-merged model: prompt masked out of the loss, [PAD] added, eval on the validation
split.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import IMAGE_CPU, IMAGE_CUDA


def sft(
    model: Input[Model],
    data: Input[Dataset],
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
    learning_rate: float = 0.0001,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
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
    max_seq_length: int = 512,
    group_by_length: bool = True,
    max_eval_examples: int = 200,
    text_mix_share: float = 0.0,
    text_mix_tokens: int = 64,
) -> None:
    """SFT from the PT-merged model: prompt masked out of the loss, [PAD] added, eval on the validation
    split."""
    from zhllama.recipes.chinese_llama_alpaca import launchers
    from zhllama.recipes.chinese_llama_alpaca.configs import SftConfig

    config = SftConfig(
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
        max_seq_length=max_seq_length,
        group_by_length=group_by_length,
        max_eval_examples=max_eval_examples,
        text_mix_share=text_mix_share,
        text_mix_tokens=text_mix_tokens,
    )
    launchers.sft(
        model,
        data,
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
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


sft_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(sft)
sft_gpu = dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)(sft)
