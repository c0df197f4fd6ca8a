"""What a pipeline step needs around a recipe's library call: logging, where tracking goes,
artifact folders, a torchrun relaunch, and a KFP Metrics file. Nothing here imports kfp: an
artifact is anything with a ``path`` (and ``log_metric`` for Metrics).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from zhllama.core.tracking import RunTarget

log = logging.getLogger(__name__)


def step_setup(mlflow_tracking_uri: str = "", mlflow_experiment: str = "") -> RunTarget:
    """Logging, and tracking: the URI from the step's parameter (else the environment), the
    pipeline run from ``$ZHLLAMA_PIPELINE_RUN_ID``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if not os.environ.get("ZHLLAMA_PIPELINE_RUN_ID"):
        log.warning("ZHLLAMA_PIPELINE_RUN_ID is not set: this step's MLflow run gets a parent of its own")
    return RunTarget(experiment=mlflow_experiment or None)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for a KFP Metrics artifact."""
    from zhllama.core.tracking import numeric_metrics

    return {k.replace(".", "_"): v for k, v in numeric_metrics(metrics).items() if abs(v) < 1e300}


def log_kfp_metrics(metrics_artifact: Any, result: dict[str, Any]) -> None:
    """Numbers of ``result`` onto a KFP ``Output[Metrics]``, and as JSON at the artifact's path:
    kfp.local treats a cache entry whose artifact file is missing as a miss, so a Metrics output
    that only lives in metadata would make its step re-run forever."""
    values = numeric(result)
    for key, value in values.items():
        metrics_artifact.log_metric(key, value)
    path = Path(metrics_artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def subdir(path: str, sub: str) -> str:
    """A folder inside an input artifact (stage 1's ``model/``), or the artifact itself."""
    return str(Path(path) / sub) if sub else path


def torchrun(module: str, argv: list[str], nproc_per_node: int, nnodes: int) -> None:
    """Run ``python -m module argv...`` under torchrun; the node rank and rendezvous address come
    from the environment a PyTorchJob (or the Kubeflow Trainer) sets."""
    node_rank = os.environ.get("NODE_RANK", os.environ.get("RANK", "0") if nnodes > 1 else "0")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
        "-m",
        module,
        *argv,
    ]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def config_flags(cfg: Any) -> list[str]:
    """A config dataclass as the ``--field value`` options the CLI reads back."""
    import dataclasses

    flags = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        flags += [f"--{field.name}", ",".join(value) if isinstance(value, list) else str(value)]
    return flags
