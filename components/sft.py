"""Instruction tuning with LoRA on the alpaca-format data (zhllama.steps.sft)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU, IMAGE_CUDA
from zhllama.config import SftConfig

SCALE = [("nproc_per_node", int, 1), ("nnodes", int, 1)]


def build(image: str):
    return make_component(
        "sft",
        "SFT from the PT-merged model: prompt masked out of the loss, [PAD] added, eval on the validation split.",
        image,
        {"model": "Input[Model]", "data": "Input[Dataset]", "run": "Output[Model]", "metrics": "Output[Metrics]"},
        stage_parameters(SftConfig, extra=SCALE),
        "steps.log_kfp_metrics(metrics, steps.sft(model.path, data.path, run.path, locals()))",
    )


sft = build(IMAGE_CPU)
sft_gpu = build(IMAGE_CUDA)
