"""Registration of the final model in the MLflow model registry, and promotion by alias.

Every new version gets the alias ``challenger``. The promotion gate compares its evaluation
figures with the version holding ``champion`` and moves ``champion`` only when it wins; the
decision and the compared figures are written as version tags. Promotions take a lock (a
registered model ``<name>.promotion-lock``, whose creation is atomic in the registry), so two
registrations racing both get versions and leave the aliases consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zhllama.core import tracking
from zhllama.core.config import RegisterConfig, parse_floor_threshold, parse_promotion_metric
from zhllama.core.io import InputError, read_json

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
STATE_TAG = "zhllama.state"  # pending while a registration is under way, ready when whole
METRIC_TAG = "metric."
DECISION_TAG = "promotion.decision"
FLOOR_TAG = "promotion.floor"
GATE_TAG = "promotion.gate"  # passed: the challenger may win; with a smoke test, champion moves after it
SMOKE_TAG = "promotion.smoke"  # passed / failed: the challenger's server answered the smoke prompts
AWAITING_SMOKE = "awaiting smoke test"
# The floor's margin compares these two summary metrics: the task accuracy, and the accuracy of
# the majority-class baseline (always the test split's commonest answer).
ACCURACY_METRIC, MAJORITY_METRIC = "task_accuracy_loglik", "task_majority_share"


class RegistryError(RuntimeError):
    """Registration or promotion could not be done; the message says why."""


def _not_found(err: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower()


def champion_version(client, name: str):
    """The version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if _not_found(err):
            return None
        raise


def version_metrics(version) -> dict[str, float]:
    return {k[len(METRIC_TAG) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)}


def floor_metrics(cfg: RegisterConfig) -> list[str]:
    """The summary metrics the floor reads."""
    names = [parse_floor_threshold(spec)[0] for spec in cfg.floor_thresholds]
    return list(dict.fromkeys([*names, ACCURACY_METRIC, MAJORITY_METRIC]))


def floor(candidate: dict[str, float], cfg: RegisterConfig) -> tuple[bool, str]:
    """(passes?, reason): the absolute thresholds, and the task accuracy at least
    ``floor_margin_over_majority`` above the majority-class baseline, checked by MLflow's
    ``validate_evaluation_results`` (the baseline is the majority "model")."""
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    import mlflow

    thresholds: dict[str, dict[str, Any]] = {}
    for spec in cfg.floor_thresholds:
        name, op, value = parse_floor_threshold(spec)
        thresholds[name] = {"threshold": value, "greater_is_better": op == ">="}
    margin = {"min_absolute_change": max(cfg.floor_margin_over_majority, 1e-9), "greater_is_better": True}
    thresholds[ACCURACY_METRIC] = {**thresholds.get(ACCURACY_METRIC, {}), **margin}  # >= only (RegisterConfig)
    metrics = {k: float(v) for k, v in candidate.items()}
    # The baseline "model" answers the majority class; on the other metrics only absolute thresholds
    # apply (MLflow looks every metric up in the baseline, so it carries the candidate's own values).
    baseline = {**metrics, ACCURACY_METRIC: float(candidate[MAJORITY_METRIC])}
    try:
        mlflow.validate_evaluation_results(
            {name: MetricThreshold(**kw) for name, kw in thresholds.items()},
            EvaluationResult(metrics, {}, run_id=""),
            EvaluationResult(baseline, {}, run_id=""),
        )
    except ModelValidationFailedException as err:
        failed = " ".join(str(err.message).split())
        return False, f"below the floor (majority share {baseline[ACCURACY_METRIC]:.3f}): {failed}"
    return True, (
        f"above the floor ({ACCURACY_METRIC} {metrics[ACCURACY_METRIC]:.3f}, majority share "
        f"{baseline[ACCURACY_METRIC]:.3f}, margin {cfg.floor_margin_over_majority}; {', '.join(cfg.floor_thresholds)})"
    )


def gate(
    candidate: dict[str, float], champion: dict[str, float] | None, cfg: RegisterConfig
) -> tuple[bool, str, dict[str, Any]]:
    """(promote?, reason, compared figures). The challenger must pass the floor (even with no
    champion yet), lose on no listed metric by more than ``max_regression`` and gain at least
    ``min_improvement`` (and more than 0) on one."""
    passes, why = floor(candidate, cfg) if cfg.floor else (True, "floor off")
    if not passes:
        return False, why, {}
    if champion is None:
        return True, f"no champion yet; {why}", {}
    compared: dict[str, Any] = {}
    lost, won = [], []
    for spec in cfg.promotion_metrics:
        name, direction = parse_promotion_metric(spec)
        new, old = candidate[name], champion.get(name)
        if old is None:
            compared[name] = {"challenger": new, "champion": None}
            won.append(name)  # the champion was never measured on it
            continue
        gain = new - old if direction == "max" else old - new
        compared[name] = {"challenger": new, "champion": old, "gain": gain, "direction": direction}
        if gain < -cfg.max_regression:
            lost.append(name)
        elif gain > 0 and gain >= cfg.min_improvement:
            won.append(name)
    if lost:
        return False, f"worse on {', '.join(lost)}", compared
    if not won:
        return False, f"no gain of at least {cfg.min_improvement} on any of {', '.join(compared)}", compared
    return True, f"better on {', '.join(won)}", compared


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout: float) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` for the block. A lock this process has watched, unchanged,
    for ``timeout`` seconds is stale (its holder died) and is broken. Staleness is measured on
    this process's monotonic clock, never by comparing the server's timestamps with this
    machine's wall clock (which may be skewed); so a dead holder's lock costs up to ``timeout``
    of waiting, and giving up takes twice that."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}.promotion-lock"
    holder = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    started = time.monotonic()
    watched: tuple[int, str] | None = None  # (creation timestamp, description) of the lock seen
    watched_since = started
    while True:
        try:
            client.create_registered_model(
                lock, description=f"zhllama promotion lock held by {holder}; removed when the promotion ends"
            )
            break
        except MlflowException as err:
            if "ALREADY_EXISTS" not in str(err.error_code) and "already exists" not in str(err).lower():
                raise
            with contextlib.suppress(MlflowException):
                held = client.get_registered_model(lock)
                seen = (held.creation_timestamp, held.description or "")
                if seen != watched:
                    watched, watched_since = seen, time.monotonic()
                elif time.monotonic() - watched_since > timeout:
                    log.warning("breaking stale promotion lock %s (%s)", lock, held.description)
                    client.delete_registered_model(lock)
                    continue
            if time.monotonic() - started > 2 * timeout:
                raise RegistryError(
                    f"promotion lock {lock} still held after {2 * timeout:.0f} s; delete that registered model if its holder died"
                ) from None
            time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def register(
    model_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str],
    cfg: RegisterConfig,
    log_model: Callable[[Path, str, str], Any],
    tracker: tracking.PipelineRun | None = None,
    await_smoke: bool = False,
) -> dict[str, Any]:
    """Log, register, tag and (if the gate passes) promote the final model. On failure no
    version is left behind: a version created before the error is deleted again. ``log_model``
    (the recipe's) logs ``model_dir`` into the given run and returns MLflow's ModelInfo. With
    ``await_smoke`` a version the gate lets win stays challenger (decision "awaiting smoke
    test"); ``promote_after_smoke`` moves champion once its server has answered."""
    model_dir = Path(model_dir)
    summary = read_json(Path(eval_dir) / "metrics.json").get("summary", {})
    needed = [parse_promotion_metric(spec)[0] for spec in cfg.promotion_metrics]
    needed += floor_metrics(cfg) if cfg.floor else []
    for name in needed:
        if name not in summary:
            raise InputError(
                f"{eval_dir}/metrics.json: no metric {name!r} for the promotion gate; it has {', '.join(sorted(summary))}"
            )
    tracker = tracker or tracking.PipelineRun()  # fails fast, with one message, when the server is down
    try:
        return _register(model_dir, summary, cfg, tracker, log_model, await_smoke)
    except Exception as err:
        if tracking.server_up(tracker.uri):
            raise
        raise RegistryError(
            f"MLflow at {tracker.uri} stopped answering during registration ({type(err).__name__}). A version created before "
            f"the outage stays {STATE_TAG}=pending (`zhllama promote` refuses it); re-running this registration for the same "
            "pipeline run, once the server is back, removes it (restoring champion if it had moved) and registers once"
        ) from None


def _register(
    model_dir: Path,
    summary: dict[str, float],
    cfg: RegisterConfig,
    tracker: tracking.PipelineRun,
    log_model: Callable[[Path, str, str], Any],
    await_smoke: bool,
) -> dict[str, Any]:
    client = tracker.client
    _remove_abandoned(client, cfg.model_name, tracker.pipeline_run_id)
    known = tracking.lineage(tracker.pipeline_run_id)
    with tracker.stage("register", cfg, known) as run:
        model_info = log_model(model_dir, run.run_id, tracker.uri)
        version = None
        try:
            version = _create_version(client, cfg.model_name, model_info, run.run_id, tracker.pipeline_run_id)
            lineage = client.get_run(run.run_id).data.tags
            tags = {METRIC_TAG + k: repr(float(v)) for k, v in summary.items()}
            tags.update({f"zhllama.{k}": lineage.get(f"zhllama.{k}", tracking.UNKNOWN) for k in tracking.LINEAGE_KEYS})
            tags.update({"zhllama.run_id": run.run_id, "zhllama.model_dir": str(model_dir)})
            for key, value in tags.items():
                client.set_model_version_tag(cfg.model_name, version.version, key, value)
            decision = _promote_by_gate(client, cfg, version.version, summary, move_champion=not await_smoke)
            client.set_model_version_tag(cfg.model_name, version.version, STATE_TAG, "ready")
        except BaseException:
            if version is not None and tracking.server_up(tracker.uri):
                with contextlib.suppress(Exception):
                    client.delete_model_version(cfg.model_name, version.version)
                    log.warning("registration failed: deleted the half-registered version %s", version.version)
            raise
        run.log_metrics({"registered_version": int(version.version), "promoted": int(decision["promoted"])})
        run.set_tags({"zhllama.registered_version": version.version, DECISION_TAG: decision["decision"]})
    result = {
        "model_name": cfg.model_name,
        "version": str(version.version),
        "model_uri": model_info.model_uri,
        "run_id": run.run_id,
        **decision,
    }
    log.info(
        "registered %s version %s: %s (%s)", cfg.model_name, version.version, decision["decision"], decision["reason"]
    )
    return result


def _create_version(client, name: str, model_info, run_id: str, pipeline_run_id: str):
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # exists already
        client.create_registered_model(name, description="Chinese-LLaMA-Alpaca models trained by zhllama")
    tags = {STATE_TAG: "pending", tracking.PIPELINE_RUN_TAG: pipeline_run_id}
    return client.create_model_version(
        name, source=model_info.model_uri, run_id=run_id, tags=tags, model_id=model_info.model_id
    )


def _remove_abandoned(client, name: str, pipeline_run_id: str) -> list[str]:
    """Delete the versions an earlier attempt of this pipeline run left pending: the server died
    before that attempt could delete them. (Versions of other pipeline runs are never touched.)"""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    removed = []
    for version in versions:
        if version.tags.get(STATE_TAG) == "pending" and version.tags.get(tracking.PIPELINE_RUN_TAG) == pipeline_run_id:
            full = client.get_model_version(name, version.version)  # search results carry no aliases
            if CHAMPION in full.aliases:  # it died between moving champion and marking itself ready
                before = full.tags.get("promotion.champion_before")
                if before:
                    client.set_registered_model_alias(name, CHAMPION, before)
                else:
                    client.delete_registered_model_alias(name, CHAMPION)
            client.delete_model_version(name, version.version)
            removed.append(version.version)
    if removed:
        log.warning(
            "removed version(s) %s of %s, left pending by a failed earlier attempt of pipeline run %s",
            removed,
            name,
            pipeline_run_id,
        )
    return removed


def _promote_by_gate(
    client, cfg: RegisterConfig, version: str, summary: dict[str, float], move_champion: bool = True
) -> dict[str, Any]:
    name = cfg.model_name
    with promotion_lock(client, name, cfg.lock_timeout):
        current = champion_version(client, name)
        champion_metrics = version_metrics(current) if current is not None else None
        gate_passed, reason, compared = gate(summary, champion_metrics, cfg)
        promote = gate_passed and move_champion
        previous = current.version if current is not None else ""
        below_floor = reason.startswith("below the floor")
        if promote:
            decision = "promoted"
        elif gate_passed:
            decision = AWAITING_SMOKE
        elif below_floor:
            decision = "challenger only: below the floor" + ("" if previous else " (no champion)")
        else:
            decision = "kept champion"
        # The record first, the aliases last: a failure part-way never leaves a moved alias without
        # the tag that says where it was (_remove_abandoned puts it back from there).
        for key, value in {
            DECISION_TAG: decision,
            "promotion.reason": reason,
            "promotion.compared": json.dumps(compared),
            "promotion.champion_before": previous,
            FLOOR_TAG: "failed" if below_floor else "passed",
            GATE_TAG: "passed" if gate_passed else "failed",
        }.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
    return {
        "decision": decision,
        "promoted": promote,
        "gate_passed": gate_passed,
        "below_floor": below_floor,
        "reason": reason,
        "compared": compared,
        "champion_before": previous,
    }


def promote_after_smoke(
    version: str, smoke: dict[str, Any], cfg: RegisterConfig, uri: str | None = None
) -> dict[str, Any]:
    """Champion moves to ``version`` only if its server passed the smoke test (``smoke["passed"]``)
    and the gate still lets it win against the champion of now (another run may have promoted
    one since this version was registered). The smoke figures and the decision become version
    tags either way; a failed smoke test leaves champion where it was."""
    name, version = cfg.model_name, str(version)
    client = tracking.client(uri)
    target = client.get_model_version(name, version)
    if target.tags.get(STATE_TAG) != "ready":
        raise RegistryError(
            f"{name} version {version} is not a complete registration ({STATE_TAG}={target.tags.get(STATE_TAG)!r})"
        )
    with promotion_lock(client, name, cfg.lock_timeout):
        current = champion_version(client, name)
        previous = current.version if current is not None else ""
        if previous == version:
            return {"decision": "already champion", "promoted": False, "reason": "", "champion_before": previous}
        champion_metrics = version_metrics(current) if current is not None else None
        gate_passed, reason, compared = gate(version_metrics(target), champion_metrics, cfg)
        if not smoke.get("passed"):
            promote, decision = (
                False,
                "kept champion: smoke test failed" if previous else "challenger only: smoke test failed (no champion)",
            )
            reason = smoke.get("failure", "the smoke test failed")
        elif not gate_passed:
            promote, decision = False, "kept champion"
        else:
            promote, decision = True, "promoted"
        tags = {f"smoke.{k}": str(v) for k, v in smoke.items() if k != "answers"}
        tags.update(
            {
                SMOKE_TAG: "passed" if smoke.get("passed") else "failed",
                DECISION_TAG: decision,
                "promotion.reason": reason,
                "promotion.compared": json.dumps(compared),
                "promotion.champion_before": previous,
            }
        )
        for key, value in tags.items():  # the record first, the alias last
            client.set_model_version_tag(name, version, key, value[:5000])
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s version %s after the smoke test: %s (%s)", name, version, decision, reason)
    return {"decision": decision, "promoted": promote, "reason": reason, "champion_before": previous}


def promote(
    version: str | int, reason: str, model_name: str, uri: str | None = None, lock_timeout: float = 120.0
) -> dict[str, Any]:
    """Move ``champion`` to ``version`` by hand, recording the reason and the previous champion."""
    from mlflow.exceptions import MlflowException

    if not reason.strip():
        raise InputError("promote: give a --reason; it is recorded on the version")
    client = tracking.client(uri)
    version = str(version)
    try:
        target = client.get_model_version(model_name, version)
    except MlflowException as err:
        raise RegistryError(f"model {model_name!r} has no version {version}: {err.message}") from None
    if target.tags.get(STATE_TAG) != "ready":
        raise RegistryError(
            f"{model_name} version {version} is not a complete registration ({STATE_TAG}={target.tags.get(STATE_TAG)!r})"
        )
    with promotion_lock(client, model_name, lock_timeout):
        current = champion_version(client, model_name)
        previous = current.version if current is not None else ""
        client.set_registered_model_alias(model_name, CHAMPION, version)
        for key, value in {
            DECISION_TAG: "promoted by hand",
            "promotion.reason": reason,
            "promotion.champion_before": previous,
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }.items():
            client.set_model_version_tag(model_name, version, key, value)
    log.info("%s: champion %s -> %s (%s)", model_name, previous or "none", version, reason)
    return {"model_name": model_name, "version": version, "champion_before": previous, "reason": reason}


def data_changed(model_name: str, data_md5: str, uri: str | None = None) -> dict[str, Any]:
    """Does ``data_md5`` (what data.dvc pins now) differ from the data the champion was trained on?
    No champion counts as changed: there is nothing trained on any data yet."""
    client = tracking.client(uri)
    champion = champion_version(client, model_name)
    trained_on = champion.tags.get("zhllama.data_dvc_md5") if champion is not None else None
    return {
        "changed": trained_on != data_md5,
        "data_md5": data_md5,
        "champion_version": champion.version if champion else None,
        "champion_data_md5": trained_on,
    }
