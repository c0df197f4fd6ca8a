"""Tracking, registration and promotion against the real MLflow server (and its S3 artifacts)."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from tests.conftest import TINY_PRESET, tiny_config
from zhllama import cli
from zhllama.core import registry, tracking
from zhllama.core import services as svc
from zhllama.core.io import read_json, write_json
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.configs import RegisterConfig

pytestmark = pytest.mark.services


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _eval_with(eval_run: Path, tmp_path: Path, **changes: float) -> Path:
    """A copy of the evaluation output with some summary figures changed."""
    metrics = read_json(eval_run / "metrics.json")
    metrics["summary"].update(changes)
    out = tmp_path / f"eval-{uuid.uuid4().hex[:6]}"
    write_json(out / "metrics.json", metrics)
    return out


def _register(model_dir: Path, eval_dir: Path, cfg: RegisterConfig) -> dict:
    """The core's registration with the recipe's model logging (a pyfunc)."""
    from zhllama.recipes.chinese_llama_alpaca.serving import log_pyfunc_model

    return registry.register(model_dir, eval_dir, cfg, log_pyfunc_model)


def test_a_dead_holders_lock_is_broken_after_the_timeout_whatever_the_clocks_say(server_tracking, monkeypatch) -> None:
    """Staleness is watched time on this process's monotonic clock: a client whose wall clock runs
    an hour ahead neither breaks a live lock at once nor waits forever for a dead one."""
    client, name = tracking.client(), _name()
    lock = f"{name}.promotion-lock"
    client.create_registered_model(lock, description="held by a holder that died")
    real_time = time.time
    monkeypatch.setattr(registry.time, "time", lambda: real_time() + 3600)  # this machine's clock is skewed
    started = time.monotonic()
    with registry.promotion_lock(client, name, timeout=3.0):
        waited = time.monotonic() - started
        assert 3.0 <= waited < 10.0, waited  # waited out the timeout, then broke the dead lock
        assert "held by" in client.get_registered_model(lock).description
    with pytest.raises(MlflowException):  # released at the end of the block
        client.get_registered_model(lock)


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_chain_by_cli_leaves_nested_runs_report_and_champion(
    server_tracking, tmp_path, tiny_base, vocab_run, small_corpus, tiny_sft_data, monkeypatch
) -> None:
    """The issue's 'done when', on tiny models: every stage by CLI, one parent run, a champion."""
    monkeypatch.setenv("ZHLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    run_id, name = f"cli-{uuid.uuid4().hex[:6]}", _name()
    train = ["--preset", str(TINY_PRESET), "--max_steps", "3"]  # the tiny settings, three steps a stage
    evaluate = ["--preset", str(TINY_PRESET)]
    steps = [
        [
            "pretrain",
            "--base_model",
            str(tiny_base),
            "--tokenizer",
            str(vocab_run / "tokenizer"),
            "--train",
            str(small_corpus["train"]),
            "--out",
            str(tmp_path / "pt"),
            *train,
        ],
        [
            "merge",
            "--stage_name",
            "merge_pt",
            "--base_model",
            str(tiny_base),
            "--adapters",
            str(tmp_path / "pt"),
            "--out",
            str(tmp_path / "pt_merged"),
        ],
        [
            "sft",
            "--model",
            str(tmp_path / "pt_merged"),
            "--train",
            str(tiny_sft_data["train"]),
            "--valid",
            str(tiny_sft_data["valid"]),
            "--out",
            str(tmp_path / "sft"),
            *train,
        ],
        [
            "merge",
            "--stage_name",
            "merge_final",
            "--base_model",
            str(tmp_path / "pt_merged"),
            "--adapters",
            str(tmp_path / "sft"),
            "--out",
            str(tmp_path / "final"),
        ],
        [
            "evaluate",
            "--text",
            str(small_corpus["valid"]),
            "--tasks",
            str(tiny_sft_data["test"]),
            "--base_model",
            str(tiny_base),
            "--pt_model",
            str(tmp_path / "pt_merged"),
            "--final_model",
            str(tmp_path / "final"),
            "--vocab",
            str(vocab_run),
            "--pt_run",
            str(tmp_path / "pt"),
            "--sft_run",
            str(tmp_path / "sft"),
            "--out",
            str(tmp_path / "eval"),
            *evaluate,
        ],
        # the tiny preset: its models are not meant to learn, so its floor is off
        [
            "register",
            "--model",
            str(tmp_path / "final"),
            "--eval",
            str(tmp_path / "eval"),
            "--model_name",
            name,
            *evaluate,
        ],
    ]
    for argv in steps:
        assert cli.main(["--pipeline_run_id", run_id, *argv]) == 0, argv[0]

    tracker = tracking.PipelineRun(run_id=run_id)
    client = tracker.client
    parent = client.get_run(tracker.parent_run_id())
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_name = {r.data.tags["mlflow.runName"]: r for r in children}
    assert set(by_name) == {"pretrain_stage2", "merge_pt", "sft", "merge_final", "evaluate", "register", "serve_smoke"}
    for run in [parent, *children]:
        assert run.data.tags["zhllama.pipeline_run_id"] == run_id
        assert run.data.tags["zhllama.base_model_id"] == tracking.model_id(tiny_base)
        assert run.data.tags["zhllama.tokenizer_sha256"] == tracking.tokenizer_sha256(vocab_run / "tokenizer")
    assert all(r.info.status == "FINISHED" for r in children)
    pt = by_name["pretrain_stage2"]
    assert [m.step for m in client.get_metric_history(pt.info.run_id, "loss")] == [1, 2, 3]
    assert pt.data.params["block_size"] == "64" and pt.data.params["lora_rank"] == "8"
    evaluation = {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/plots"} <= evaluation
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "sft_test_loss" in parent.data.metrics
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags[registry.STATE_TAG] == "ready"
    assert champion.tags[registry.SMOKE_TAG] == "passed"  # the CLI's register smoke-tests before promoting
    assert champion.tags["zhllama.data_dvc_md5"] == tracking.data_dvc_md5()


def test_registered_champion_loads_and_generates(server_tracking, tmp_path, tiny_final, eval_run) -> None:
    import mlflow

    name = _name()
    result = _register(tiny_final, eval_run, tiny_config("register", model_name=name))
    assert result["version"] == "1" and result["decision"] == "promoted"
    mlflow.set_tracking_uri(server_tracking)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["instruction", "input"]
    answers = model.predict(
        [{"instruction": "判断下面这条评论的情感倾向", "input": "很好"}], params={"max_new_tokens": 4}
    )
    assert len(answers) == 1 and isinstance(answers[0], str)
    with pytest.raises(Exception, match="instruction"):
        model.predict([{"instruction": "", "input": "x"}])


def test_worse_version_is_challenger_better_one_takes_champion_manual_promotion(
    server_tracking, tmp_path, tiny_final, eval_run
) -> None:
    name = _name()
    cfg = tiny_config("register", model_name=name)
    base = read_json(eval_run / "metrics.json")["summary"]
    first = _register(tiny_final, eval_run, cfg)
    worse = _register(tiny_final, _eval_with(eval_run, tmp_path, sft_test_loss=base["sft_test_loss"] + 0.5), cfg)
    client = tracking.client()
    assert worse["decision"] == "kept champion" and "worse on sft_test_loss" in worse["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert challenger.version == worse["version"]
    compared = json.loads(challenger.tags["promotion.compared"])
    assert compared["sft_test_loss"]["champion"] == pytest.approx(base["sft_test_loss"])
    assert challenger.tags["promotion.champion_before"] == first["version"]

    better = _register(tiny_final, _eval_with(eval_run, tmp_path, sft_test_loss=base["sft_test_loss"] - 0.5), cfg)
    assert better["decision"] == "promoted"
    assert client.get_model_version_by_alias(name, "champion").version == better["version"]

    assert cli.main(["promote", "--model_name", name, "--version", first["version"], "--reason", "rollback: test"]) == 0
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == first["version"]
    assert (
        champion.tags["promotion.reason"] == "rollback: test"
        and champion.tags["promotion.champion_before"] == better["version"]
    )
    assert cli.main(["promote", "--model_name", name, "--version", "99", "--reason", "x"]) == 2


def test_the_floor_refuses_a_chance_level_first_version_then_a_good_one_takes_champion(
    server_tracking, tmp_path, tiny_final, eval_run
) -> None:
    """No champion yet, and still a model at the majority share is not promoted: it stays challenger
    with the reason tagged. A good one (accuracy 0.2 above the majority share) then takes champion."""
    name = _name()
    cfg = RegisterConfig(model_name=name)  # the default floor: accuracy >= 0.6 and >= majority + 0.1
    chance = _register(
        tiny_final, _eval_with(eval_run, tmp_path, task_accuracy_loglik=0.54, task_majority_share=0.54), cfg
    )
    client = tracking.client()
    assert chance["promoted"] is False and chance["below_floor"] is True
    assert chance["decision"].startswith("challenger only: below the floor")
    assert registry.champion_version(client, name) is None
    version = client.get_model_version(name, chance["version"])
    assert version.aliases == ["challenger"] and version.tags[registry.FLOOR_TAG] == "failed"
    assert "minimum absolute change check failed" in version.tags["promotion.reason"]
    good = _register(
        tiny_final, _eval_with(eval_run, tmp_path, task_accuracy_loglik=0.84, task_majority_share=0.54), cfg
    )
    assert good["promoted"] is True and "above the floor" in good["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == good["version"]
    assert client.get_model_version(name, good["version"]).tags[registry.FLOOR_TAG] == "passed"


def test_failure_after_version_creation_leaves_no_version(server_tracking, tiny_final, eval_run, monkeypatch) -> None:
    name = _name()

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(registry, "_promote_by_gate", broken)
    with pytest.raises(ConnectionError):
        _register(tiny_final, eval_run, tiny_config("register", model_name=name))
    assert _versions(tracking.client(), name) == []


def test_racing_registrations_both_get_versions_and_consistent_aliases(
    server_tracking, tmp_path, tiny_final, eval_run
) -> None:
    name = _name()
    base = read_json(eval_run / "metrics.json")["summary"]["sft_test_loss"]
    good = {"task_accuracy_loglik": 0.9, "task_majority_share": 0.5}  # both above the default floor
    evals = {
        "worse": _eval_with(eval_run, tmp_path, sft_test_loss=base + 1.0, **good),
        "better": _eval_with(eval_run, tmp_path, sft_test_loss=base - 1.0, **good),
    }
    # two pipeline runs finishing together
    procs = {
        label: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zhllama.cli",
                "register",
                "--model",
                str(tiny_final),
                "--eval",
                str(path),
                "--model_name",
                name,
            ],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "ZHLLAMA_PIPELINE_RUN_ID": f"race-{label}-{uuid.uuid4().hex[:6]}"},
        )
        for label, path in evals.items()
    }
    outputs = {label: p.communicate(timeout=600)[0] for label, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
    client = tracking.client()
    versions = _versions(client, name)
    assert [v.version for v in versions] == ["1", "2"]
    assert all(v.tags[registry.STATE_TAG] == "ready" for v in versions)
    champion = client.get_model_version_by_alias(name, "champion")
    # whichever came first, the better one ends champion and says so
    assert float(champion.tags["metric.sft_test_loss"]) == pytest.approx(base - 1.0)
    assert champion.tags["promotion.decision"] == "promoted"
    other = next(v for v in versions if v.version != champion.version)
    # The tags tell one story in the order the lock gave: first promoted with no champion, second compared.
    if champion.tags["promotion.champion_before"] == other.version:
        assert other.tags["promotion.decision"] == "promoted" and other.tags["promotion.champion_before"] == ""
        second = champion
    else:
        assert champion.tags["promotion.champion_before"] == ""
        assert (
            other.tags["promotion.decision"] == "kept champion"
            and other.tags["promotion.champion_before"] == champion.version
        )
        second = other
    # challenger: whichever registration took the gate's lock last (the smoke tests may finish in either order)
    assert client.get_model_version_by_alias(name, "challenger").version in {"1", "2"}
    assert second.tags[registry.SMOKE_TAG] == "passed"
    assert not [m for m in client.search_registered_models(f"name = '{name}.promotion-lock'")]  # lock released


def test_server_down_clear_error_no_version_then_retry_registers_once(
    services, server_tracking, tiny_final, eval_run
) -> None:
    name = _name()
    svc.stop("mlflow", services)
    try:
        started = time.monotonic()
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "zhllama.cli",
                "register",
                "--model",
                str(tiny_final),
                "--eval",
                str(eval_run),
                "--model_name",
                name,
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert code.returncode == 2
        assert (
            "MLflow tracking server" in code.stderr
            and "not reachable" in code.stderr
            and "Traceback" not in code.stderr
        )
        assert time.monotonic() - started < 60
    finally:
        svc.start_mlflow(services)
    client = tracking.client()
    assert _versions(client, name) == []
    result = _register(tiny_final, eval_run, tiny_config("register", model_name=name))
    assert [v.version for v in _versions(client, name)] == [result["version"]] == ["1"]


@pytest.mark.parametrize("dies", ["after_version_created", "after_champion_moved"])
def test_fault_server_dies_during_registration_then_retry_registers_once(
    services, server_tracking, tmp_path, tiny_final, eval_run, monkeypatch, dies
) -> None:
    """The server is killed part-way through a registration (once the version exists; or once
    the champion alias has moved to it): one clear error; back up, the version is pending and
    refused by promote; the retry of the same pipeline run leaves one complete version, champion
    where the gate puts it."""
    from mlflow import MlflowClient

    name = _name()
    base = read_json(eval_run / "metrics.json")["summary"]["sft_test_loss"]
    first = _register(
        tiny_final, _eval_with(eval_run, tmp_path, sft_test_loss=base + 1.0), tiny_config("register", model_name=name)
    )
    better = _eval_with(eval_run, tmp_path, sft_test_loss=base - 1.0)
    run_id = f"outage-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now: the client would retry for minutes
    if dies == "after_version_created":
        gate = registry._promote_by_gate

        def die_then_gate(*args, **kwargs):
            svc.stop("mlflow", services)
            return gate(*args, **kwargs)

        monkeypatch.setattr(registry, "_promote_by_gate", die_then_gate)
    else:
        tag = MlflowClient.set_model_version_tag

        def die_before_ready(self, model, version, key, value):
            if key == registry.STATE_TAG and value == "ready":
                svc.stop("mlflow", services)
            return tag(self, model, version, key, value)

        monkeypatch.setattr(MlflowClient, "set_model_version_tag", die_before_ready)
    try:
        started = time.monotonic()
        with pytest.raises(registry.RegistryError, match="stopped answering during registration") as failure:
            _register(tiny_final, better, tiny_config("register", model_name=name))
        assert "re-running this registration" in str(failure.value)
        assert time.monotonic() - started < 120
    finally:
        monkeypatch.setattr(registry, "_promote_by_gate", registry._promote_by_gate)
        monkeypatch.undo()
        svc.start_mlflow(services)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", run_id)  # the retry of that pipeline run
    client = tracking.client()
    left = [v for v in _versions(client, name) if v.version != first["version"]]
    assert [v.tags[registry.STATE_TAG] for v in left] == ["pending"]  # abandoned, never "ready"
    assert (
        cli.main(["promote", "--model_name", name, "--version", left[0].version, "--reason", "x"]) == 2
    )  # and refused
    result = _register(tiny_final, better, tiny_config("register", model_name=name))
    versions = _versions(client, name)
    assert [v.version for v in versions] == [first["version"], result["version"]]
    assert all(v.tags[registry.STATE_TAG] == "ready" for v in versions)
    assert client.get_model_version_by_alias(name, "champion").version == result["version"]
    assert (
        result["champion_before"] == first["version"]
    )  # champion was back on the first version before the retry's gate
