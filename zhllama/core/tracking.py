"""MLflow tracking: one parent run per pipeline run, one nested run per stage, lineage tags on all.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (``make services`` exports the local
server's). When none is configured, runs go to a local store under ``mlruns/`` (a SQLite file
and an artifact folder: MLflow 3's plain file backend is in maintenance mode and refuses to
start), so stages and unit tests work without a server.

Stages running in different processes (CLI calls, Kubeflow steps) join the same parent run
through the pipeline run id (``ZHLLAMA_PIPELINE_RUN_ID`` or ``--pipeline_run_id``): the parent
is the run of the experiment tagged with that id, created by whichever stage comes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zhllama.core.io import sha256_file
from zhllama.core.settings import PROJECT_ROOT, get_settings

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "zhllama"
TAG = "zhllama."
PIPELINE_RUN_TAG = TAG + "pipeline_run_id"
KIND_TAG = TAG + "run_kind"
LINEAGE_KEYS = ("git_commit", "data_dvc_md5", "pipeline_run_id", "base_model_id", "tokenizer_sha256")
UNKNOWN = "unknown"
PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message says which and what to do."""


def local_store_dir() -> Path:
    return Path(os.environ.get("ZHLLAMA_MLRUNS", str(PROJECT_ROOT / "mlruns")))


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one clear message, when a configured server does not answer
    (MLflow's own client would retry for minutes first)."""
    if not is_remote(uri):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}): start it with `make services`, "
            f"or unset MLFLOW_TRACKING_URI to track into the local store {local_store_dir()}"
        ) from None


def server_up(uri: str, timeout: float = 5.0) -> bool:
    """Does the tracking server answer now? (Always True for a local store.) Cleanup paths ask
    first: against a dead server every MLflow call retries for minutes before failing."""
    try:
        check_server(uri, timeout)
    except TrackingError:
        return False
    return True


def client(uri: str | None = None):
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    check_server(uri)
    if not is_remote(uri):
        local_store_dir().mkdir(parents=True, exist_ok=True)
        # the local store's first use creates its tables: MLflow says so on stderr, next to our one-line errors
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3's UI opens an experiment without this tag on its GenAI overview; these are training runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    # A local store keeps artifacts beside its database, not in the working directory.
    location = None if is_remote(mlflow_client.tracking_uri) else (local_store_dir() / "artifacts").as_uri()
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except Exception:  # another stage created it first
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# --- lineage ------------------------------------------------------------------------------------


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The checkout's commit (``-dirty`` with local changes); ``ZHLLAMA_GIT_COMMIT`` in images."""
    if os.environ.get("ZHLLAMA_GIT_COMMIT"):
        return os.environ["ZHLLAMA_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN
    return commit + ("-dirty" if dirty else "")


def data_dvc_md5(dvc_file: Path | None = None) -> str:
    """The md5 that ``data.dvc`` pins (what the data is), ``ZHLLAMA_DATA_DVC_MD5`` in images."""
    if os.environ.get("ZHLLAMA_DATA_DVC_MD5"):
        return os.environ["ZHLLAMA_DATA_DVC_MD5"]
    import yaml

    dvc_file = dvc_file or get_settings().data_dvc_file
    try:
        outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return UNKNOWN


def model_id(model_dir: str | os.PathLike[str]) -> str:
    """``name@sha256:<12>`` over config.json and the weight files' names and sizes: cheap for 7B
    models, and it changes whenever the weights are rewritten."""
    import hashlib

    path = Path(model_dir)
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weight in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return f"{path.name}@sha256:{digest.hexdigest()[:12]}"


def tokenizer_sha256(tokenizer_dir: str | os.PathLike[str]) -> str:
    model = Path(tokenizer_dir) / "tokenizer.model"
    return sha256_file(model) if model.is_file() else UNKNOWN


def lineage(
    pipeline_run_id: str,
    base_model: str | os.PathLike[str] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    base_model_id: str | None = None,
) -> dict[str, str]:
    """The lineage tags; what a stage cannot know yet stays ``unknown`` until a later stage fills it."""
    return {
        "git_commit": git_commit(),
        "data_dvc_md5": data_dvc_md5(),
        "pipeline_run_id": pipeline_run_id,
        "base_model_id": base_model_id or (model_id(base_model) if base_model else UNKNOWN),
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir) if tokenizer_dir else UNKNOWN,
    }


def new_pipeline_run_id() -> str:
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def pipeline_run_id() -> str:
    """``ZHLLAMA_PIPELINE_RUN_ID`` or a new id (then this process's stages form their own run)."""
    value = os.environ.get("ZHLLAMA_PIPELINE_RUN_ID")
    if not value:
        value = os.environ["ZHLLAMA_PIPELINE_RUN_ID"] = new_pipeline_run_id()
    return value


# --- params and metrics -------------------------------------------------------------------------


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Every field of a config dataclass (or dict), lists joined by commas, as MLflow params."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        flat[name] = text[:PARAM_MAX_CHARS]
    return flat


def numeric_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics dict, as MLflow metric names (``a.b``)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            flat[name] = float(value)
        elif isinstance(value, dict) and key != "config":
            flat.update(numeric_metrics(value, f"{name}."))
    return flat


# --- runs ---------------------------------------------------------------------------------------


class StageRun:
    """A nested run for one stage. Step metrics are buffered and sent in batches, and a failed
    send is retried at the next flush: a tracking hiccup never stops a training run."""

    FLUSH_EVERY = 50

    def __init__(self, tracker: PipelineRun, run_id: str, name: str) -> None:
        self.tracker, self.run_id, self.name = tracker, run_id, name
        self._pending: list[Any] = []

    @property
    def client(self):
        return self.tracker.client

    def log_step(self, entry: dict[str, Any]) -> None:
        """One training-log entry (``step`` plus numbers) as step metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(entry.get("step", 0))
        self._pending.extend(
            Metric(k, float(v), now, step) for k, v in entry.items() if k != "step" and isinstance(v, int | float)
        )
        if len(self._pending) >= self.FLUSH_EVERY:
            self.flush(strict=False)

    def flush(self, strict: bool = True) -> None:
        """Send the pending step metrics (``log_batch`` splits them into MLflow's per-request
        limits); on failure keep them for the next flush unless ``strict``."""
        if not self._pending:
            return
        try:
            self.client.log_batch(self.run_id, metrics=self._pending)
        except Exception as err:
            if strict:
                raise
            log.warning("could not send %d step metrics to MLflow (%s); will retry", len(self._pending), err)
            return
        self._pending.clear()

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
        )

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])  # chunked by MLflow

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_data_input(self, digest: str, source: str, name: str = "data", context: str = "training") -> None:
        """The data this run trained on, as an MLflow dataset input (the UI's Dataset column):
        ``digest`` is the DVC md5 that pins it, ``source`` where DVC keeps it."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name, digest=digest, source_type="dvc", source=json.dumps({"uri": source, "md5": digest})
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])

    def add_lineage(self, known: dict[str, str]) -> None:
        """Lineage this stage produced (its tokenizer, its base model): onto this run and the parent."""
        merged = self.tracker.record_lineage(known)
        self.set_tags({TAG + k: v for k, v in merged.items() if k in known})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class PipelineRun:
    """One pipeline run in MLflow: finds or creates its parent run and opens nested stage runs under it."""

    def __init__(self, run_id: str | None = None, experiment: str | None = None, uri: str | None = None) -> None:
        self.uri = uri or tracking_uri()
        self.pipeline_run_id = run_id or pipeline_run_id()
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.client = client(self.uri)
        self.experiment_id = experiment_id(self.client, self.experiment)
        self._parent: str | None = None

    def _find_parent(self) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{self.pipeline_run_id}' and tags.`{KIND_TAG}` = 'pipeline'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def parent_run_id(self) -> str:
        if self._parent is None:
            self._parent = self._find_parent()
        if self._parent is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"pipeline {self.pipeline_run_id}",
                tags={PIPELINE_RUN_TAG: self.pipeline_run_id, KIND_TAG: "pipeline"},
            )
            self._parent = run.info.run_id
            # Two first stages racing may both create one; the oldest is the parent for everyone.
            self._parent = self._find_parent() or self._parent
            log.info("MLflow: pipeline run %s -> parent run %s (%s)", self.pipeline_run_id, self._parent, self.uri)
        return self._parent

    def parent(self) -> StageRun:
        """The parent run, with the same logging methods as a stage run."""
        return StageRun(self, self.parent_run_id(), "pipeline")

    def parent_lineage(self) -> dict[str, str]:
        tags = self.client.get_run(self.parent_run_id()).data.tags
        return {k: tags[TAG + k] for k in LINEAGE_KEYS if tags.get(TAG + k, UNKNOWN) != UNKNOWN}

    def record_lineage(self, known: dict[str, str]) -> dict[str, str]:
        """Merge what this stage knows into the parent's lineage; returns the combined lineage."""
        from mlflow.entities import RunTag

        merged = {k: UNKNOWN for k in LINEAGE_KEYS}
        merged.update({k: v for k, v in known.items() if v != UNKNOWN})
        merged.update(self.parent_lineage())  # the first value a pipeline run saw stays its lineage
        merged.update({k: v for k, v in known.items() if v != UNKNOWN and merged[k] == UNKNOWN})
        self.client.log_batch(self.parent_run_id(), tags=[RunTag(TAG + k, v) for k, v in merged.items()])
        return merged

    @contextlib.contextmanager
    def stage(self, name: str, config: Any = None, known_lineage: dict[str, str] | None = None) -> Iterator[StageRun]:
        """A nested run for one stage: FINISHED when the block ends, FAILED when it raises."""
        parent = self.parent_run_id()
        tags = {"mlflow.parentRunId": parent, KIND_TAG: "stage", TAG + "stage": name}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        stage_run = StageRun(self, run.info.run_id, name)
        stage_run.set_tags({TAG + k: v for k, v in self.record_lineage(known_lineage or {}).items()})
        if config is not None:
            stage_run.log_params(flatten_params(config))
        self.client.update_run(parent, status="RUNNING")  # a retried stage revives a failed pipeline run
        log.info("MLflow: stage %s -> run %s", name, self.run_url(stage_run.run_id))
        try:
            yield stage_run
            stage_run.flush()
        except BaseException:
            if server_up(self.uri):  # else the runs stay RUNNING: a dead server can be told nothing
                stage_run.flush(strict=False)
                with contextlib.suppress(Exception):
                    self.client.set_terminated(stage_run.run_id, "FAILED")
                    self.client.set_terminated(parent, "FAILED")
            raise
        self.client.set_terminated(stage_run.run_id, "FINISHED")

    def stage_seconds(self) -> dict[str, float]:
        """Each finished stage run of this pipeline run: its name -> its duration in seconds."""
        parent = self._find_parent()
        if parent is None:
            return {}
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
            order_by=["attributes.start_time ASC"],
        )
        return {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time}

    def backfill_lineage(self) -> dict[str, str]:
        """Give every run of this pipeline run the lineage that later stages learned."""
        from mlflow.entities import RunTag

        full = {k: UNKNOWN for k in LINEAGE_KEYS} | self.parent_lineage()
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id()}'"
        )
        for run in children:
            missing = [
                RunTag(TAG + k, v)
                for k, v in full.items()
                if run.data.tags.get(TAG + k, UNKNOWN) == UNKNOWN and v != UNKNOWN
            ]
            if missing:
                self.client.log_batch(run.info.run_id, tags=missing)
        return full

    def finish(self, status: str = "FINISHED") -> None:
        self.backfill_lineage()
        self.client.set_terminated(self.parent_run_id(), status)

    def run_url(self, run_id: str) -> str:
        if is_remote(self.uri):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"{self.uri} (run {run_id}; browse with `mlflow ui --backend-store-uri {self.uri}`)"


@dataclasses.dataclass
class RunTarget:
    """Where a stage's MLflow run goes: the pipeline run (its parent) and the experiment."""

    pipeline_run_id: str | None = None
    experiment: str | None = None


class _Untracked:
    """What ranks other than 0 of a torchrun launch get: rank 0 alone talks to MLflow."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(
    target: RunTarget | None,
    stage: str,
    config: Any,
    base_model: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Iterator[StageRun]:
    """A nested MLflow run for one stage of the pipeline run ``target`` names (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield _Untracked()  # type: ignore[misc]
        return
    target = target or RunTarget()
    pipeline = PipelineRun(run_id=target.pipeline_run_id, experiment=target.experiment)
    known = lineage(pipeline.pipeline_run_id, base_model=base_model, tokenizer_dir=tokenizer)
    with pipeline.stage(stage, config, known) as run:
        yield run


def stage_lineage(
    base_model: str | os.PathLike[str] | None = None, tokenizer: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """The lineage a stage adds once its output exists (the model's id, the tokenizer's hash)."""
    known = {}
    if base_model:
        known["base_model_id"] = model_id(base_model)
    if tokenizer:
        known["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    return known
