"""Merge a LoRA run's adapter into its base weights: merge_pt and merge_final (zhllama.steps.merge)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU
from zhllama.config import MergeConfig

merge = make_component(
    "merge",
    "base + adapter -> a whole Hugging Face model (logits equal the adapter model's); a second merge is refused.",
    IMAGE_CPU,
    {"base_model": "Input[Model]", "adapter_run": "Input[Model]", "merged": "Output[Model]"},
    stage_parameters(MergeConfig, extra=[("stage_name", str, "merge"), ("base_model_subdir", str, "")]),
    "steps.merge(steps.subdir(base_model.path, base_model_subdir), adapter_run.path, merged.path, stage_name, locals())",
)
