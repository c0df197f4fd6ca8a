"""Continued pretraining, stage 1 (embeddings) or 2 (LoRA + embed_tokens/lm_head) (zhllama.steps.pretrain).
``nproc_per_node``/``nnodes`` > 1 launch torchrun inside the container."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU, IMAGE_CUDA
from zhllama.config import PretrainConfig

SCALE = [("nproc_per_node", int, 1), ("nnodes", int, 1), ("base_model_subdir", str, "")]


def build(image: str):
    return make_component(
        "pretrain",
        "Pretrain on the corpus with the merged tokenizer; the run directory holds adapter/ (stage 2) or model/ (stage 1).",
        image,
        {"base_model": "Input[Model]", "vocab": "Input[Model]", "data": "Input[Dataset]", "run": "Output[Model]", "metrics": "Output[Metrics]"},
        stage_parameters(PretrainConfig, extra=SCALE),
        "steps.log_kfp_metrics(metrics, steps.pretrain(steps.subdir(base_model.path, base_model_subdir), vocab.path, data.path, run.path, locals()))",
    )


pretrain = build(IMAGE_CPU)
pretrain_gpu = build(IMAGE_CUDA)
