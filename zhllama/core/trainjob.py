"""A training stage as a Kubeflow Trainer v2 TrainJob, launched from a pipeline step.

The step (``launch``) puts its input folders in the object store, writes a job spec beside
them, submits a TrainJob through the ``kubeflow`` SDK's ``TrainerClient`` (on a cluster: a
``CustomTrainerContainer`` of the project's image on the ``torch-distributed`` runtime, its
command ``python -m zhllama.core.trainjob node --spec URI``), streams node 0's log into its
own, waits, and fetches the run folder node 0 stored. The job's nodes share no volume: each
reads its inputs from S3 (``node``), trains under torchrun, and rank 0 alone writes the output
and tracks to MLflow, under the pipeline's parent run (its id travels in the environment).

The same ``launch`` runs here on the SDK's container backend (``backend="container"``: one
container per node on the project's Docker engine). This machine forbids the per-job bridge
network that backend creates, so ``HostNetworkDocker`` runs the nodes on the host network
instead, with node 0's name resolving to 127.0.0.1. Nothing here imports kfp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError
from zhllama.core.training import durable

log = logging.getLogger(__name__)

RUNTIME = "torch-distributed"
NODE_COMMAND = ["python", "-m", "zhllama.core.trainjob", "node", "--spec"]
# Outputs never shipped back: local checkpoints (the durable copy is in the store) and upload snapshots.
OUTPUT_SKIP = ("checkpoints", ".upload")
# What the launching step's service account may do: deploy/trainer/rbac.yaml (tested against the SDK's requests).


@dataclass
class JobSpec:
    """What every node of the job runs: ``argv`` for ``zhllama.cli``, where ``{input:NAME}``
    and ``{output}`` stand for local folders the node fills from ``inputs`` (NAME -> s3 URI)."""

    argv: list[str]
    inputs: dict[str, str]
    output: str
    nproc_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)


def _s3_json(s3: Any, uri: str, obj: Any | None = None) -> Any:
    bucket, key = durable.parse_s3_uri(uri)
    if obj is not None:
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(obj, indent=1).encode())
        return obj
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def job_name(work_uri: str) -> str:
    """A DNS-1035 name: the task's key hashed, plus a suffix per attempt (a retried step's new
    job never meets the old one's name)."""
    return f"zh-{hashlib.sha256(work_uri.encode()).hexdigest()[:10]}-{uuid.uuid4().hex[:5]}"


# --- the step's side ---------------------------------------------------------------------------


def trainer_client(backend: str, namespace: str = ""):
    """``kubernetes`` (in-cluster config, else ~/.kube/config; namespace: the argument, else the
    pod's own), or ``container`` (the project's Docker engine, host network)."""
    from kubeflow.trainer import TrainerClient

    if backend == "kubernetes":
        from kubeflow.common.types import KubernetesBackendConfig

        ns = namespace or _pod_namespace()
        return TrainerClient(backend_config=KubernetesBackendConfig(namespace=ns) if ns else None)
    if backend == "container":
        from kubeflow.trainer import ContainerBackendConfig, TrainingRuntimeSource

        from zhllama.core.containers import docker_host

        host = docker_host()
        if host is None:
            raise InputError("train_launcher=trainjob on the container backend: no Docker engine answers (make engine)")
        client = TrainerClient(
            backend_config=ContainerBackendConfig(
                container_host=host,
                container_runtime="docker",
                pull_policy="Never",  # the project's image is local; no registry is reachable here
                runtime_source=TrainingRuntimeSource(sources=[]),  # the SDK's packaged runtimes, no download
            )
        )
        client.backend._adapter = HostNetworkDocker(host)
        return client
    raise InputError(f"trainjob backend {backend!r}: kubernetes or container")


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return os.environ.get("ZHLLAMA_TRAINJOB_NAMESPACE") or (path.read_text().strip() if path.is_file() else "")


def launch(
    spec: JobSpec,
    input_dirs: dict[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    work_uri: str,
    image: str,
    nnodes: int,
    resources_per_node: dict[str, Any] | None = None,
    backend: str = "kubernetes",
    namespace: str = "",
    runtime: str = RUNTIME,
    timeout: float = 7 * 24 * 3600,
    client: Any = None,
) -> dict[str, Any]:
    """Run ``spec`` as a TrainJob of ``nnodes`` nodes and put node 0's run folder in
    ``out_dir``; raises with the job's error when it fails. ``work_uri``: the task's own
    s3 prefix (inputs, spec and output go under it). ``client``: a TrainerClient of one's own
    (else one for ``backend``)."""
    from kubeflow.trainer import CustomTrainer, CustomTrainerContainer
    from kubeflow.trainer.options import Name

    s3 = durable.client()
    started = time.perf_counter()
    for name, folder in input_dirs.items():
        bucket, prefix = durable.parse_s3_uri(spec.inputs[name])
        size = durable.put_folder(s3, bucket, prefix, Path(folder))
        log.info("trainjob input %s: %.1f MB to %s", name, size / 1e6, spec.inputs[name])
    spec_uri = f"{work_uri}/spec.json"
    _s3_json(s3, spec_uri, asdict(spec))
    staged = time.perf_counter() - started

    client = client or trainer_client(backend, namespace)
    name = job_name(work_uri)
    env = {**spec.env, "ZHLLAMA_TRAINJOB": name}
    if backend == "kubernetes":
        from kubeflow.trainer.options import TrainerCommand

        trainer = CustomTrainerContainer(
            image=image, num_nodes=nnodes, resources_per_node=resources_per_node or None, env=env
        )
        options = [Name(name=name), TrainerCommand(command=[*NODE_COMMAND, spec_uri])]
    else:  # the SDK's local backends take a function: it runs under the torchrun they start
        trainer = CustomTrainer(
            func=trainjob_node, func_args={"spec": spec_uri}, image=image, num_nodes=nnodes, env=env
        )
        options = [Name(name=name)]
    log.info("submitting TrainJob %s: %d node(s) x %d process(es), image %s", name, nnodes, spec.nproc_per_node, image)
    client.train(runtime=client.get_runtime(runtime), trainer=trainer, options=options)
    try:
        errors: list[str] = []
        job = _follow(client, name, timeout, errors)
        if job.status != "Complete":
            cause = f"{errors[0]}\n" if errors else ""
            raise RuntimeError(f"TrainJob {name} ended {job.status}: {cause}{_failure(client, name)}")
        fetch_started = time.perf_counter()
        durable.get_folder(s3, spec.output, Path(out_dir))
        fetched = time.perf_counter() - fetch_started
    finally:
        try:
            client.delete_job(name)
        except Exception as err:  # a job we cannot delete is the cluster's to collect; say so
            log.warning("TrainJob %s was not deleted: %s", name, err)
    wall = time.perf_counter() - started
    log.info("TrainJob %s complete: %.1f s in all (inputs %.1f s, output %.1f s)", name, wall, staged, fetched)
    return {
        "trainjob": name,
        "trainjob_seconds": wall,
        "trainjob_stage_seconds": staged,
        "trainjob_fetch_seconds": fetched,
    }


# A node's own error line (the CLI's "zhllama STAGE: error: ..." or an exception's last line), not torchrun's wrapper.
_ERROR_LINE = re.compile(r"^(zhllama [\w-]+: error: .*|(?!.*ChildFailedError)[\w.]*(Error|Exception): .+)$")


def _follow(client: Any, name: str, timeout: float, errors: list[str]):
    """The nodes' logs into this step's log while the job runs (their error lines into
    ``errors``); the job once it has ended."""
    deadline = time.monotonic() + timeout
    client.wait_for_job_status(name, status={"Running", "Complete", "Failed"}, timeout=int(timeout))
    try:
        for chunk in client.get_job_logs(name, follow=True):
            for line in str(chunk).splitlines():
                print(f"[{name}] {line}", flush=True)
                if _ERROR_LINE.match(line.strip()) and line.strip() not in errors:
                    errors.append(line.strip())
    except Exception as err:  # logs are a convenience; the status decides
        log.warning("TrainJob %s: log stream ended (%s)", name, err)
    while True:
        job = client.get_job(name)
        if job.status in ("Complete", "Failed") or time.monotonic() > deadline:
            return job
        time.sleep(2)


def _failure(client: Any, name: str) -> str:
    """Why the job failed: its Failed condition's message (a cluster), or each node's exit code
    and log tail (the SDK's container backend), else its events."""
    backend = client.backend

    def condition() -> str:
        from kubeflow.trainer.constants import constants

        job = backend.custom_api.get_namespaced_custom_object(
            constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name
        )
        failed = [c for c in job.get("status", {}).get("conditions", []) if c.get("type") == "Failed"]
        return "; ".join(f"{c.get('reason', '')}: {c.get('message', '')}" for c in failed)

    for attempt in (
        lambda: backend._build_failure_message(name),
        condition,
        lambda: "; ".join(f"{e.reason}: {e.message}" for e in client.get_job_events(name)),
    ):
        try:
            if text := attempt():
                return str(text)
        except Exception:
            continue
    return "(no message; see the job's pods)"


def trainjob_node(spec: str) -> None:
    """What the SDK's local backends run in each node (under their torchrun): the node's work.
    Self-contained, because the SDK ships this function's source into the container."""
    import sys

    from zhllama.core.trainjob import node_main

    sys.exit(node_main(spec))


# --- a node's side -----------------------------------------------------------------------------


def node_main(spec_uri: str) -> int:
    """One node: fetch the inputs, train (under torchrun: ours when the runtime started none), and
    on node 0 store the run folder; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    s3 = durable.client()
    spec = JobSpec(**_s3_json(s3, spec_uri))
    work = Path(tempfile.mkdtemp(prefix="zhllama-trainjob-"))
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the step had no server either: track where this node can write
        os.environ["ZHLLAMA_MLRUNS"] = str(work / "mlruns")
        log.warning(
            "no MLFLOW_TRACKING_URI on this node: its stage run goes to %s and is lost with it", work / "mlruns"
        )
    local = {name: work / "inputs" / name for name in spec.inputs}
    for name, uri in spec.inputs.items():
        durable.get_folder(s3, uri, local[name])
    out = work / "out"
    argv = [fill(a, local, out) for a in spec.argv]
    node_rank = int(os.environ.get("PET_NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    if "RANK" in os.environ:  # already a torchrun worker (the SDK's container backend starts one per node)
        from zhllama.cli import main

        code = main(argv)
        is_zero = int(os.environ["RANK"]) == 0
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={os.environ.get('PET_NNODES', '1')}",
            f"--node_rank={node_rank}",
            f"--master_addr={os.environ.get('PET_MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={os.environ.get('PET_MASTER_PORT', '29500')}",
            "-m",
            "zhllama.cli",
            *argv,
        ]
        log.info("node %d: %s", node_rank, " ".join(cmd))
        code = subprocess.run(cmd).returncode
        is_zero = node_rank == 0
    if code == 0 and is_zero:
        bucket, prefix = durable.parse_s3_uri(spec.output)
        size = durable.put_folder(s3, bucket, prefix, out, skip=OUTPUT_SKIP)
        log.info("node 0: run folder (%.1f MB) stored at %s", size / 1e6, spec.output)
    return code


def fill(arg: str, inputs: dict[str, str | os.PathLike[str]], out: str | os.PathLike[str]) -> str:
    """One argument of a JobSpec's argv with ``{input:NAME}`` and ``{output}`` replaced by local folders."""
    for name, path in inputs.items():
        arg = arg.replace(f"{{input:{name}}}", str(path))
    return arg.replace("{output}", str(out))


# --- the SDK's Docker adapter, on the host network ---------------------------------------------


def _docker_adapter_base():
    from kubeflow.trainer.backends.container.adapters.docker import DockerClientAdapter

    return DockerClientAdapter


class HostNetworkDocker(_docker_adapter_base()):  # type: ignore[misc]
    """The SDK's Docker adapter with every node on the host network: the per-job network it
    would create becomes a record of its labels only, and node 0's name resolves to 127.0.0.1
    in every node (the rendezvous the backend sets up uses that name)."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__(host)
        self._networks: dict[str, dict[str, Any]] = {}

    def create_network(self, name: str, labels: dict[str, str]) -> str:
        self._networks[name] = {"id": name, "name": name, "labels": dict(labels)}
        return name

    def delete_network(self, network_id: str) -> None:
        self._networks.pop(network_id, None)

    def get_network(self, network_id: str) -> dict | None:
        return self._networks.get(network_id)

    def create_and_start_container(
        self,
        image: str,
        command: list[str],
        name: str,
        network_id: str,
        environment: dict[str, str],
        labels: dict[str, str],
        volumes: dict[str, dict[str, str]],
        working_dir: str,
    ) -> str:
        master = name.rsplit("-node-", 1)[0] + "-node-0"
        container = self.client.containers.run(
            image=image,
            command=tuple(command),
            name=name,
            detach=True,
            working_dir=working_dir,
            network_mode="host",
            extra_hosts={master: "127.0.0.1"},
            environment=environment,
            labels=labels,
            volumes=volumes,
            auto_remove=False,
        )
        return container.id


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m zhllama.core.trainjob")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="one TrainJob node: fetch inputs, train, store the output (node 0)")
    node.add_argument("--spec", required=True, help="s3:// URI of the job spec the launching step wrote")
    args = parser.parse_args(argv)
    return node_main(args.spec)


if __name__ == "__main__":
    sys.exit(main())
