"""Evaluation: bits/char per model, task metrics, tokenizer efficiency, samples, report (zhllama.steps.evaluate)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU
from zhllama.config import EvalConfig

evaluate = make_component(
    "evaluate",
    "Scores base, PT-merged and final models on the held-out splits; the report renders in the Kubeflow UI.",
    IMAGE_CPU,
    {"data": "Input[Dataset]", "base_model": "Input[Model]", "pt_merged": "Input[Model]", "final": "Input[Model]",
     "vocab": "Input[Model]", "pt_run": "Input[Model]", "sft_run": "Input[Model]",
     "evaluation": "Output[Artifact]", "report": "Output[HTML]", "metrics": "Output[Metrics]"},
    stage_parameters(EvalConfig),
    """
summary = steps.evaluate(data.path, base_model.path, pt_merged.path, final.path, vocab.path, pt_run.path, sft_run.path,
                         evaluation.path, locals(), report_path=report.path)
steps.log_kfp_metrics(metrics, summary)
""",
)
