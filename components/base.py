"""The base model: a copy of base_model_uri, or the embedded tiny random LLaMA (zhllama.steps.base)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU
from zhllama.config import BaseModelConfig

base = make_component(
    "base",
    "A Hugging Face LLaMA-family model directory with its SentencePiece tokenizer.",
    IMAGE_CPU,
    {"model": "Output[Model]"},
    stage_parameters(BaseModelConfig, extra=[("base_model_uri", str, "")]),
    "steps.base(model.path, base_model_uri, locals())",
)
