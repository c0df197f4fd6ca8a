"""The cluster side of train_launcher=trainjob, as far as it can run here: the kubeflow SDK's
Kubernetes backend, unchanged, talks HTTP to a recording stand-in for the API server (no
Kubernetes API server runs on this machine); the object store is the real one. What the step
submits is a valid TrainJob of the Trainer's own API models; every request the SDK makes is one
deploy/trainer/rbac.yaml allows; the runtime manifest parses; node 0's log reaches the step."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from zhllama.core.settings import PROJECT_ROOT

pytestmark = pytest.mark.services

NAMESPACE = "team-a"
RUNTIME = yaml.safe_load((PROJECT_ROOT / "deploy" / "trainer" / "training-runtime.yaml").read_text())
NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Api(BaseHTTPRequestHandler):
    """Answers the requests the SDK makes for one TrainJob that completes at once."""

    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        self.server.requests.append((method, url.path, parse_qs(url.query)))
        jobs = self.server.jobs
        if url.path.endswith("/configmaps/kubeflow-trainer-public"):
            return self._send(
                200, {"apiVersion": "v1", "kind": "ConfigMap", "data": {"kubeflow_trainer_version": "v2.1.0"}}
            )
        if url.path.endswith("/trainingruntimes/torch-distributed"):
            return self._send(200, {**RUNTIME, "metadata": {**RUNTIME["metadata"], "namespace": NAMESPACE}})
        if parts[-1] == "trainjobs" and method == "POST":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["metadata"].update(namespace=NAMESPACE, creationTimestamp=NOW)
            jobs[body["metadata"]["name"]] = body
            self.server.created.append(body)
            return self._send(201, body)
        if "trainjobs" in parts and parts[-2] == "trainjobs":
            name = parts[-1]
            if method == "DELETE":
                jobs.pop(name, None)
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            condition = {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "lastTransitionTime": NOW}
            condition["message"] = "done"
            return self._send(200, {**jobs[name], "status": {"conditions": [condition]}})
        if url.path.endswith("/pods") and method == "GET":
            name = next(iter(self.server.jobs), "x")
            pod = {
                "metadata": {
                    "name": f"{name}-node-0-0-abcde",
                    "namespace": NAMESPACE,
                    "creationTimestamp": NOW,
                    "labels": {
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": "0",
                    },
                },
                "spec": {"containers": [{"name": "node", "image": "x"}]},
                "status": {"phase": "Succeeded"},
            }
            return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]})
        if url.path.endswith("/log"):
            return self._send(200, "node 0: step 1/1 loss 1.0\n", "text/plain")
        return self._send(
            404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}
        )

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


@pytest.fixture()
def api_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    server.requests, server.jobs, server.created = [], {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()


def _access(method: str, path: str, query: dict) -> tuple[str, str, str]:
    """(API group, resource[/subresource], verb) of one request, as RBAC sees it."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if rest[:1] == ["namespaces"]:
        rest = rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(method)
    if verb is None:
        verb = "get" if name else ("watch" if query.get("watch") == ["true"] else "list")
    return group, f"{resource}/{sub}" if sub else resource, verb


def _granted() -> set[tuple[str, str, str]]:
    from kubernetes import client

    api = client.ApiClient()
    docs = list(yaml.safe_load_all((PROJECT_ROOT / "deploy" / "trainer" / "rbac.yaml").read_text()))
    granted = set()
    for doc in docs:
        kind = doc["kind"]
        model = api._ApiClient__deserialize(doc, f"V1{kind}")  # the manifest is valid RBAC
        if kind in ("Role", "ClusterRole"):
            granted |= {
                (g, r, v) for rule in model.rules for g in rule.api_groups for r in rule.resources for v in rule.verbs
            }
        else:
            assert model.role_ref.name in {d["metadata"]["name"] for d in docs if d["kind"] == model.role_ref.kind}
            assert [s.name for s in model.subjects] == ["pipeline-runner"]
    return granted


def test_the_step_submits_a_valid_trainjob_and_needs_only_what_the_rbac_manifest_grants(
    tmp_path: Path, services, api_server, monkeypatch, capsys
) -> None:
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubeflow_trainer_api import models
    from kubernetes.client import Configuration

    from zhllama.core import trainjob
    from zhllama.core.training import durable

    for key, value in services.s3_env().items():
        monkeypatch.setenv(key, value)
    models.TrainerV1alpha1TrainingRuntime.from_dict(RUNTIME)  # the runtime manifest is one the Trainer takes
    work = f"s3://{services.checkpoint_bucket}/cluster-test/run-1/pretrain/trainjob"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # what node 0 stores when it is done (no node runs here: the stand-in completes the job at once)
    done = tmp_path / "node0"
    done.mkdir()
    (done / "metrics.json").write_text(json.dumps({"steps": 1}))
    bucket, prefix = durable.parse_s3_uri(f"{work}/output")
    durable.put_folder(durable.client(), bucket, prefix, done)

    config = Configuration()
    config.host = f"http://127.0.0.1:{api_server.server_port}"
    client = TrainerClient(backend_config=KubernetesBackendConfig(namespace=NAMESPACE, client_configuration=config))
    spec = trainjob.JobSpec(
        argv=["pretrain", "--base_model", "{input:base_model}", "--out", "{output}"],
        inputs={"base_model": f"{work}/inputs/base_model"},
        output=f"{work}/output",
        nproc_per_node=4,
        env={"ZHLLAMA_PIPELINE_RUN_ID": "run-1", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    )
    info = trainjob.launch(
        spec,
        {"base_model": model},
        tmp_path / "out",
        work,
        image="ghcr.io/zhllama/zhllama-cuda:0.1.0",
        nnodes=2,
        resources_per_node={"cpu": "8", "memory": "64G", "gpu": "1"},
        backend="kubernetes",
        client=client,
    )
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"steps": 1}
    assert f"[{info['trainjob']}] node 0: step 1/1 loss 1.0" in capsys.readouterr().out

    assert len(api_server.created) == 1 and not api_server.jobs  # one TrainJob, deleted at the end
    job = models.TrainerV1alpha1TrainJob.from_dict(api_server.created[0])
    assert job.spec.runtime_ref.name == "torch-distributed"
    trainer = job.spec.trainer
    assert trainer.num_nodes == 2 and trainer.image == "ghcr.io/zhllama/zhllama-cuda:0.1.0"
    assert trainer.command == [*trainjob.NODE_COMMAND, f"{work}/spec.json"]
    limits = api_server.created[0]["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1" and str(limits["memory"]) == "64G", limits
    env = {e.name: e.value for e in trainer.env}
    assert env["ZHLLAMA_PIPELINE_RUN_ID"] == "run-1" and env["ZHLLAMA_TRAINJOB"] == info["trainjob"]
    assert not any("SECRET" in name or "ACCESS_KEY" in name for name in env), "a credential went into the TrainJob"

    # every request the SDK made (but its version probe of the Trainer's public ConfigMap in
    # kubeflow-system, which it only logs when refused) is one the manifest allows
    needed = {_access(*r) for r in api_server.requests if "kubeflow-trainer-public" not in r[1]}
    assert {("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "delete")} <= needed
    assert ("", "pods/log", "get") in needed
    missing = needed - _granted()
    assert not missing, f"deploy/trainer/rbac.yaml does not allow {sorted(missing)}"
