"""Serving a registered version from the registry (MLflow's scoring server, a real process on
loopback), the deploy-then-promote smoke step, and the KServe manifest for an alias, against the
real MLflow server and object store."""

import subprocess
import sys
import uuid

import pytest

from tests.conftest import tiny_config
from zhllama.core import deploy, model_server, registry, tracking
from zhllama.core import services as svc
from zhllama.core.config import SmokeConfig
from zhllama.core.io import read_json, write_json
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca import runs
from zhllama.recipes.chinese_llama_alpaca.serving import log_pyfunc_model

pytestmark = pytest.mark.services

SMOKE = SmokeConfig(task_items=2, max_new_tokens=4, answer_timeout=60, start_timeout=300)


def _name() -> str:
    return f"serve-{uuid.uuid4().hex[:8]}"


def _eval_with(eval_run, tmp_path, **changes):
    metrics = read_json(eval_run / "metrics.json")
    metrics["summary"].update(changes)
    out = tmp_path / f"eval-{uuid.uuid4().hex[:6]}"
    write_json(out / "metrics.json", metrics)
    return out


def _register(model_dir, eval_dir, name: str, await_smoke: bool) -> dict:
    cfg = tiny_config("register", model_name=name)
    result = registry.register(model_dir, eval_dir, cfg, log_pyfunc_model, await_smoke=await_smoke)
    return {**result, "register_config": cfg.__dict__}


@pytest.fixture(scope="module")
def served(services, tiny_final, eval_run):
    """A champion registered without a smoke test, served once for the module's tests."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = services.mlflow_uri
    name = _name()
    _register(tiny_final, eval_run, name, await_smoke=False)
    version = model_server.resolve_version(name, alias="champion")
    running = model_server.start(name, version, settings=services, timeout=300)
    yield running
    model_server.stop(services)
    assert model_server.running(services) is None


def _ask(url: str, **payload) -> model_server.Answer:
    return model_server.invoke(url, payload, timeout=60)


GOOD = {"dataframe_records": [{"instruction": "中国的首都是哪里？"}], "params": {"max_new_tokens": 4}}
BAD_REQUESTS = {
    "missing instruction": ({"dataframe_records": [{"input": "很好"}]}, "missing inputs ['instruction']"),
    "instruction not a string": (
        {"dataframe_records": [{"instruction": 123}]},
        "'instruction' must be a non-empty string",
    ),
    "empty instruction": ({"dataframe_records": [{"instruction": "  "}]}, "'instruction' must be a non-empty string"),
    "input not a string": ({"dataframe_records": [{"instruction": "x", "input": 5}]}, "'input' must be a string"),
    "max_new_tokens not a number": (
        {"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": "many"}},
        "max_new_tokens",
    ),
    "max_new_tokens beyond the context": (
        {"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": 100000}},
        "max_new_tokens must be between 1 and 256",
    ),
    "top_p out of range": (
        {"dataframe_records": [{"instruction": "x"}], "params": {"top_p": 3.0}},
        "top_p must be in (0, 1]",
    ),
    "input longer than the context": (
        {"dataframe_records": [{"instruction": "判断情感", "input": "很好" * 2000}]},
        "exceeds the model's context of 256 tokens",
    ),
    "no records at all": ({"rows": []}, "dataframe_records"),
}


def test_served_version_answers_in_chinese_through_the_response_marker(services, served) -> None:
    answer = _ask(served.url, **GOOD)
    assert answer.status == 200, answer.body
    (text,) = answer.body["predictions"]
    assert isinstance(text, str) and text.strip() and "### Response" not in text
    # fixed seed: the same request gives the same answer
    assert _ask(served.url, **GOOD).body == answer.body
    import psutil

    server = psutil.Process(served.pid)
    listening = [
        c.laddr
        for proc in (server, *server.children(recursive=True))
        for c in (getattr(proc, "net_connections", None) or proc.connections)(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert model_server.running(services)["version"] == served.version


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(served, case) -> None:
    payload, message = BAD_REQUESTS[case]
    answer = _ask(served.url, **payload)
    assert 400 <= answer.status < 500, (answer.status, answer.body)
    assert message in answer.body["message"], answer.body
    assert _ask(served.url, **GOOD).status == 200


def test_an_unknown_alias_is_refused_before_anything_starts(services, served) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zhllama.cli", "serve", "--model_name", served.model_name, "--alias", "canary"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert (
        f"model {served.model_name!r} has no alias 'canary' (its aliases: challenger -> v1, champion -> v1)"
        in out.stderr
    )
    assert svc._read_pid(services, "serve") == served.pid  # the running server is untouched


def test_the_smoke_step_promotes_a_challenger_whose_server_answers(server_tracking, tmp_path, tiny_final, eval_run):
    name = _name()
    registration = _register(tiny_final, eval_run, name, await_smoke=True)
    assert registration["decision"] == registry.AWAITING_SMOKE and registration["gate_passed"]
    client = tracking.client()
    assert registry.champion_version(client, name) is None  # the gate alone moves nothing
    result = runs.serve_smoke(registration, eval_run, SMOKE)
    assert result["smoke"] == "passed" and result["promoted"] is True, result
    figures = result["figures"]
    assert figures["answered"] == figures["prompts"] == 4  # 2 sample prompts + 2 task items
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == "1"
    assert version.tags[registry.SMOKE_TAG] == "passed" and version.tags[registry.DECISION_TAG] == "promoted"
    assert float(version.tags["smoke.latency_p50_seconds"]) < SMOKE.answer_timeout
    # A second smoke run of the same registration (a retried step) changes nothing.
    assert runs.serve_smoke(registration, eval_run, SMOKE)["decision"] == "already champion"


def test_a_version_whose_artifact_is_corrupt_never_becomes_champion(
    services, server_tracking, tmp_path, tiny_final, eval_run
) -> None:
    name = _name()
    base = read_json(eval_run / "metrics.json")["summary"]["sft_test_loss"]
    _register(tiny_final, eval_run, name, await_smoke=False)  # v1: champion
    better = _eval_with(eval_run, tmp_path, sft_test_loss=base - 1.0)
    registration = _register(tiny_final, better, name, await_smoke=True)  # v2: the gate says it wins
    assert registration["version"] == "2" and registration["decision"] == registry.AWAITING_SMOKE
    # Corrupt v2's weights in the object store, as a bad upload or a bit flip would.
    bucket = services.mlflow_bucket
    s3 = svc.s3_client(services)
    model_id = tracking.client().get_model_version(name, "2").source.removeprefix("models:/")
    location = (
        tracking.client().get_logged_model(model_id).artifact_location
    )  # mlflow-artifacts:/<exp>/models/<id>/artifacts
    key = location.removeprefix("mlflow-artifacts:/").lstrip("/") + "/artifacts/model/model.safetensors"
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 1000, key
    s3.put_object(Bucket=bucket, Key=key, Body=b"not a safetensors file")
    result = runs.serve_smoke(registration, better, SMOKE)
    assert result["smoke"] == "failed" and result["promoted"] is False
    assert "did not start" in result["figures"]["failure"]
    client = tracking.client()
    assert client.get_model_version_by_alias(name, "champion").version == "1"  # champion stayed
    v2 = client.get_model_version(name, "2")
    assert v2.tags[registry.SMOKE_TAG] == "failed"
    assert v2.tags[registry.DECISION_TAG] == "kept champion: smoke test failed"
    assert "did not start" in v2.tags["promotion.reason"]
    assert client.get_model_version_by_alias(name, "challenger").version == "2"


def test_deploy_renders_a_valid_inference_service_for_the_alias(services, served) -> None:
    manifest = deploy.inference_service(served.model_name, alias="champion", namespace="team-a")
    assert manifest["kind"] == "InferenceService" and manifest["metadata"]["namespace"] == "team-a"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    # storageUri is the version's Hugging Face folder, and it is there in the object store
    bucket, _, prefix = model["storageUri"].removeprefix("s3://").partition("/")
    listed = svc.s3_client(services).list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    names = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert manifest["metadata"]["annotations"]["zhllama/model-version"] == served.version
    deploy.validate(manifest)  # every field is one of the SDK's models' (render checks it too)
    assert "AWS_SECRET_ACCESS_KEY" not in str(manifest) and manifest["spec"]["predictor"]["serviceAccountName"]
    with pytest.raises(deploy.DeployError, match="no alias 'nope'"):
        deploy.inference_service(served.model_name, alias="nope")
