"""Pipeline steps: what each Kubeflow component calls, with artifact directories in and out.

A component (components/) declares its typed inputs, outputs and parameters and makes one
call here; this module never imports kfp. Parameters arrive as the component's ``locals()``
and become the stage's config dataclass, so the config checks run in the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from zhllama import stages
from zhllama.config import BaseModelConfig, EvalConfig, MergeConfig, PretrainConfig, RegisterConfig, SftConfig, VocabConfig
from zhllama.io import InputError, read_json

log = logging.getLogger(__name__)

# Where each stage's files live inside the artifacts the steps pass along.
CORPUS_TRAIN, CORPUS_VALID, CORPUS_TEST = "corpus/train.txt", "corpus/valid.txt", "corpus/test.txt"
SFT_TRAIN, SFT_VALID, SFT_TEST = "sft/train.json", "sft/valid.json", "sft/test.json"


def config_from_params(cls: type, params: dict[str, Any]) -> Any:
    """The config dataclass from a component's parameters (the fields it names, nothing else)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if k in names})


def setup(params: dict[str, Any]) -> stages.Tracking:
    """Logging, and tracking: the URI from the step's parameter (else the environment), the
    pipeline run from ``$ZHLLAMA_PIPELINE_RUN_ID``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if params.get("mlflow_tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = params["mlflow_tracking_uri"]
    if not os.environ.get("ZHLLAMA_PIPELINE_RUN_ID"):
        log.warning("ZHLLAMA_PIPELINE_RUN_ID is not set: this step's MLflow run gets a parent of its own")
    return stages.Tracking(experiment=params.get("mlflow_experiment") or None)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for a KFP Metrics artifact."""
    from zhllama.tracking import numeric_metrics

    return {k.replace(".", "_"): v for k, v in numeric_metrics(metrics).items() if abs(v) < 1e300}


def log_kfp_metrics(metrics_artifact: Any, result: dict[str, Any]) -> None:
    """Numbers of ``result`` onto a KFP ``Output[Metrics]`` (anything with ``log_metric``), and as
    JSON at the artifact's path: kfp.local treats a cache entry whose artifact file is missing as
    a miss, so a Metrics output that only lives in metadata would make its step re-run forever."""
    values = numeric(result)
    for key, value in values.items():
        metrics_artifact.log_metric(key, value)
    path = Path(metrics_artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def subdir(path: str, sub: str) -> str:
    """A folder inside an input artifact (stage 1's ``model/``), or the artifact itself."""
    return str(Path(path) / sub) if sub else path


# --- the steps ----------------------------------------------------------------------------------


def check_prerequisites(params: dict[str, Any]) -> dict[str, Any]:
    """Seconds, before any training: every stage's config builds (values in range), the tracking
    server answers, and the promotion metrics are ones evaluation produces."""
    from zhllama import tracking
    from zhllama.config import parse_promotion_metric

    checked = {}
    for prefix, cls in (("vocab_", VocabConfig), ("base_", BaseModelConfig), ("pt_", PretrainConfig), ("sft_", SftConfig),
                        ("merge_", MergeConfig), ("eval_", EvalConfig), ("register_", RegisterConfig)):
        stage_params = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        try:
            config_from_params(cls, stage_params)
        except (ValueError, TypeError) as err:
            raise InputError(f"pipeline parameters {prefix}*: {err}") from None
        checked[cls.__name__] = len(stage_params)
    if params.get("pt_stage1_max_steps", 1) < 0:
        raise InputError("pipeline parameter pt_stage1_max_steps must be >= 0")
    uri = params.get("mlflow_tracking_uri") or tracking.tracking_uri()
    tracking.check_server(uri)
    known = {"final_bits_per_char", "pt_merged_bits_per_char", "task_accuracy_loglik", "task_exact_match", "sft_test_loss"}
    for spec in params.get("register_promotion_metrics") or []:
        name, _ = parse_promotion_metric(spec)
        if name not in known:
            raise InputError(f"pipeline parameter register_promotion_metrics: {name!r} is not an evaluation metric ({', '.join(sorted(known))})")
    return {"configs_checked": len(checked), "tracking_uri": uri}


def data(out: str, revision: str, repo: str, expected_md5: str, params: dict[str, Any]) -> dict[str, Any]:
    from zhllama.datasets import materialize_data

    setup(params)
    return materialize_data(out, revision, repo, expected_md5)


def base(out: str, base_model_uri: str, params: dict[str, Any]) -> dict[str, Any]:
    """The embedded tiny random base when ``base_model_uri`` is empty, else a copy of that model."""
    from zhllama.modeling import fetch_model

    where = setup(params)
    if base_model_uri:
        return fetch_model(base_model_uri, out)
    return stages.base(out, config_from_params(BaseModelConfig, params), where=where)


def vocab(data_dir: str, base_model_dir: str, out: str, params: dict[str, Any]) -> dict[str, Any]:
    where = setup(params)
    cfg = config_from_params(VocabConfig, params)
    tokenizer = Path(base_model_dir) / "tokenizer.model"
    if not tokenizer.is_file():
        raise InputError(f"{base_model_dir}: the base model has no tokenizer.model (SentencePiece) to extend")
    return stages.vocab([Path(data_dir) / CORPUS_TRAIN], [Path(data_dir) / CORPUS_VALID], out, cfg, tokenizer, where=where)


def _torchrun(command: str, argv: list[str], nproc_per_node: int, nnodes: int, global_flags: list[str] | None = None) -> None:
    """Run ``zhllama <command>`` under torchrun; the node rank and rendezvous address come from
    the environment a PyTorchJob (or the Kubeflow Trainer) sets."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}",
           f"--node_rank={os.environ.get('NODE_RANK', os.environ.get('RANK', '0') if nnodes > 1 else '0')}",
           f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
           "-m", "zhllama.cli", *(global_flags or []), command, *argv]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def _tracking_flags(params: dict[str, Any]) -> list[str]:
    """The step's tracking choice for the relaunched ranks: CLI options that go before the
    subcommand (the run id travels in the environment)."""
    return ["--experiment", params["mlflow_experiment"]] if params.get("mlflow_experiment") else []


def _flags(cfg: Any) -> list[str]:
    flags = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        flags += [f"--{field.name}", ",".join(value) if isinstance(value, list) else str(value)]
    return flags


def pretrain(base_model_dir: str, vocab_dir: str, data_dir: str, out: str, params: dict[str, Any]) -> dict[str, Any]:
    where = setup(params)
    cfg = config_from_params(PretrainConfig, params)
    tokenizer, train = Path(vocab_dir) / "tokenizer", Path(data_dir) / CORPUS_TRAIN
    nproc, nnodes = int(params.get("nproc_per_node", 1)), int(params.get("nnodes", 1))
    if nproc * nnodes > 1:
        _torchrun("pretrain", ["--base_model", base_model_dir, "--tokenizer", str(tokenizer), "--train", str(train), "--out", out,
                               *_flags(cfg)], nproc, nnodes, _tracking_flags(params))
        return read_json(Path(out) / "metrics.json")
    return stages.pretrain(base_model_dir, tokenizer, [train], out, cfg, where=where)


def stage1_model(run_dir: str) -> str:
    """Stage 1 writes a whole model (trained embeddings) under ``model/``: stage 2's base."""
    return str(Path(run_dir) / "model")


def merge(base_model_dir: str, adapter_run: str, out: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    where = setup(params)
    return stages.merge(base_model_dir, [adapter_run], out, config_from_params(MergeConfig, params), name=name, where=where)


def sft(model_dir: str, data_dir: str, out: str, params: dict[str, Any]) -> dict[str, Any]:
    where = setup(params)
    cfg = config_from_params(SftConfig, params)
    train, valid = Path(data_dir) / SFT_TRAIN, Path(data_dir) / SFT_VALID
    nproc, nnodes = int(params.get("nproc_per_node", 1)), int(params.get("nnodes", 1))
    if nproc * nnodes > 1:
        _torchrun("sft", ["--model", model_dir, "--train", str(train), "--valid", str(valid), "--out", out, *_flags(cfg)], nproc, nnodes,
                  _tracking_flags(params))
        return read_json(Path(out) / "metrics.json")
    return stages.sft(model_dir, train, valid, out, cfg, where=where)


def evaluate(data_dir: str, base_model_dir: str, pt_merged_dir: str, final_dir: str, vocab_dir: str, pt_run: str, sft_run: str,
             out: str, params: dict[str, Any], report_path: str | None = None) -> dict[str, Any]:
    from zhllama.evaluate import EvalInputs

    where = setup(params)
    inputs = EvalInputs(text_file=Path(data_dir) / CORPUS_TEST, task_file=Path(data_dir) / SFT_TEST, base_model=base_model_dir,
                        pt_merged_model=pt_merged_dir, final_model=final_dir, vocab_dir=vocab_dir, pt_run=pt_run, sft_run=sft_run)
    summary = stages.evaluate(inputs, out, config_from_params(EvalConfig, params), where=where)["summary"]
    if report_path:  # the HTML artifact the Kubeflow UI renders
        shutil.copyfile(Path(out) / "report.html", report_path)
    return summary


def register(final_dir: str, eval_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    where = setup(params)
    return stages.register(final_dir, eval_dir, config_from_params(RegisterConfig, params), where=where)
