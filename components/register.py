"""Log the final model to MLflow, register a version, gate promotion to champion (zhllama.steps.register)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU
from zhllama.config import RegisterConfig

register = make_component(
    "register",
    "A new registered version with alias challenger; champion moves only when the gate passes.",
    IMAGE_CPU,
    {"final": "Input[Model]", "evaluation": "Input[Artifact]", "metrics": "Output[Metrics]"},
    stage_parameters(RegisterConfig),
    """
result = steps.register(final.path, evaluation.path, locals())
steps.log_kfp_metrics(metrics, {"version": int(result["version"]), "promoted": int(result["promoted"])})
return f"{result['model_name']} version {result['version']}: {result['decision']} ({result['reason']})"
""",
    returns="str",
)
