"""The pipeline's parameters: every stage config field, prefixed by its stage, plus the run-wide
ones. Built from the config dataclasses (zhllama/config.py), so each knob and its default is
declared once; each default is the recipe's unless the field's help says otherwise."""

from __future__ import annotations

from typing import Any

from components._factory import config_parameters
from zhllama.config import BaseModelConfig, EvalConfig, MergeConfig, PretrainConfig, RegisterConfig, SftConfig, VocabConfig

# prefix -> (config, fields the DAG itself sets)
STAGES: dict[str, tuple[type, tuple[str, ...]]] = {
    "vocab_": (VocabConfig, ()),
    "base_": (BaseModelConfig, ()),
    "pt_": (PretrainConfig, ("stage",)),  # the DAG runs stage 1 (optional) and stage 2
    "sft_": (SftConfig, ()),
    "merge_": (MergeConfig, ()),
    "eval_": (EvalConfig, ()),
    "register_": (RegisterConfig, ()),
}

# name, type, default, what it is
RUN_PARAMETERS: list[tuple[str, type, Any, str]] = [
    ("data_revision", str, "", "git revision whose data.dvc names the data; empty: the data in the image's checkout"),
    ("data_repo", str, "", "git URL of the project for data_revision; empty: the image's checkout"),
    ("data_md5", str, "", "DVC md5 the data must have (keys the data step's cache on content); empty: what data.dvc pins"),
    ("base_model_uri", str, "", "base model directory or s3://bucket/prefix; empty: the embedded tiny random LLaMA"),
    ("mlflow_tracking_uri", str, "", "MLflow server; empty: $MLFLOW_TRACKING_URI of the step's environment"),
    ("mlflow_experiment", str, "zhllama", "MLflow experiment"),
    ("pt_stage1", bool, False, "run pretraining stage 1 (embeddings only) before stage 2, as the recipe's two-stage PT"),
    ("pt_stage1_max_steps", int, 100, "stage 1 optimizer steps (its other settings are the pt_* ones)"),
    ("train_nproc_per_node", int, 1, "processes (GPUs) per node for pretrain and sft: torchrun inside the container"),
    ("train_nnodes", int, 1, "nodes for pretrain and sft (a multi-node launch needs MASTER_ADDR/NODE_RANK, e.g. a PyTorchJob)"),
]


def pipeline_parameters() -> list[tuple[str, type, Any]]:
    """(name, type, default) for every pipeline parameter, in UI order."""
    params = [(name, tp, default) for name, tp, default, _ in RUN_PARAMETERS]
    for prefix, (cls, dag_set) in STAGES.items():
        params += [(prefix + name, tp, default) for name, tp, default in config_parameters(cls, exclude=dag_set)]
    return params


def stage_arguments(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The arguments of one stage's component: its config fields' prefixed parameters, unprefixed
    (run-wide ones that share the prefix, like base_model_uri or pt_stage1, are not the stage's)."""
    cls, dag_set = STAGES[prefix]
    fields = {name for name, _, _ in config_parameters(cls, exclude=dag_set)}
    return {name[len(prefix):]: value for name, value in values.items() if name.startswith(prefix) and name[len(prefix):] in fields}


def arguments_from_preset(preset: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A preset YAML's sections (vocab:, pretrain:, ...) as pipeline arguments."""
    section_prefix = {"vocab": "vocab_", "base": "base_", "pretrain": "pt_", "sft": "sft_", "merge": "merge_",
                      "evaluate": "eval_", "register": "register_"}
    known = {name for name, _, _ in pipeline_parameters()}
    args = {}
    for section, values in preset.items():
        for key, value in (values or {}).items():
            if section == "pretrain" and key == "stage":
                if value != 2:
                    raise ValueError("preset pretrain.stage: the pipeline always ends with stage 2; set pt_stage1=true to run stage 1 first")
                continue
            name = section_prefix[section] + key
            if name not in known:
                raise ValueError(f"preset {section}.{key}: not a pipeline parameter")
            args[name] = value
    return args
