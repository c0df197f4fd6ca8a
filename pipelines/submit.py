"""This recipe's pipeline compiled and submitted (``zhllama compile``, ``zhllama submit``), through
the platform's KFP helpers (zhllama/core/kfp_submit.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zhllama.core import kfp_submit
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

COMPILED = {
    0: Path(__file__).resolve().parent / "chinese_llama_alpaca.yaml",
    1: Path(__file__).resolve().parent / "chinese_llama_alpaca_gpu.yaml",
}
# Training in Kubeflow Trainer v2 TrainJobs (GPU nodes), launched by light pipeline steps.
COMPILED_TRAINJOB = Path(__file__).resolve().parent / "chinese_llama_alpaca_trainjob.yaml"
TRAINJOB_GPUS = 1  # per TrainJob node; train_nproc_per_node processes each


def compiled_path(gpus: int = 0, launcher: str = "in_pod") -> Path:
    return COMPILED_TRAINJOB if launcher == "trainjob" else COMPILED[1 if gpus else 0]


def compile_pipeline(out: str | os.PathLike[str] | None = None, gpus: int = 0, launcher: str = "in_pod") -> Path:
    """Write the compiled pipeline YAML (the file a user uploads in the Kubeflow UI); the
    trainjob variant's TrainJob nodes have TRAINJOB_GPUS GPUs unless ``gpus`` says otherwise."""
    from pipelines.chinese_llama_alpaca import build_pipeline

    if launcher == "trainjob":
        gpus = gpus or TRAINJOB_GPUS
    return kfp_submit.compile_pipeline(
        build_pipeline(gpus, launcher=launcher), Path(out) if out else compiled_path(gpus, launcher)
    )


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` strings as typed pipeline arguments; unknown names and bad values are errors."""
    return kfp_submit.parse_params(pairs, RECIPE.pipeline_parameters())


def submit(
    host: str,
    experiment: str,
    params: list[str],
    run_name: str | None = None,
    gpus: int = 0,
    dry_run: bool = False,
    package: str | os.PathLike[str] | None = None,
    image_tag: str | None = None,
) -> dict[str, Any]:
    """Compile, check the arguments and images, then create a run on ``host`` (see kfp_submit.submit)."""
    arguments = parse_params(params)
    package_path = (
        Path(package) if package else PROJECT_ROOT / ".kfp_outputs" / "submit" / COMPILED[1 if gpus else 0].name
    )
    return kfp_submit.submit(
        host,
        experiment,
        arguments,
        package_path,
        lambda path: compile_pipeline(path, gpus),
        run_name=run_name,
        dry_run=dry_run,
        image_tag=image_tag,
    )
