"""Serve a registered MLflow model version over HTTP, from the registry, and talk to it.

The server is MLflow's own scoring server (``mlflow models serve -m models:/NAME/VERSION
--env-manager local``): it downloads the version's artifacts through the tracking server, loads
its pyfunc and answers ``POST /invocations``; ``GET /ping`` says it is up. (MLServer with its
MLflow runtime, what KServe runs for MLflow-format models, would pull fastapi 0.115 and
starlette 0.46 under MLflow 3.17's fastapi 0.165 / starlette 1.10, and grpc, gevent and
tritonclient with them; MLflow's server is already in the stack.)

It binds to 127.0.0.1, logs to ``<state_dir>/<service>.log`` and is stopped by the PID in
``<state_dir>/<service>.pid``, as the other local services are. ``<state_dir>/<service>.json``
says which version it serves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from zhllama.core import services, tracking
from zhllama.core.io import write_json
from zhllama.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

SERVICE = "serve"


class ServeError(RuntimeError):
    """The model could not be resolved, or its server did not start or answer."""


@dataclasses.dataclass(frozen=True)
class Served:
    """A running scoring server."""

    model_name: str
    version: str
    model_uri: str
    url: str
    pid: int
    log_path: str
    seconds_to_ready: float


def resolve_version(model_name: str, alias: str = "", version: str = "", uri: str | None = None) -> str:
    """The version number an alias names (or ``version`` itself, checked to exist)."""
    from mlflow.exceptions import MlflowException

    if bool(alias) == bool(version):
        raise ServeError("give exactly one of an alias (champion, challenger, ...) or a version number")
    client = tracking.client(uri)
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        raise ServeError(f"no registered model {model_name!r} at {client.tracking_uri}: {err.message}") from None
    if alias:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise ServeError(f"model {model_name!r} has no alias {alias!r} (its aliases: {known})")
        return str(aliases[alias])
    try:
        client.get_model_version(model_name, str(version))
    except MlflowException:
        raise ServeError(f"model {model_name!r} has no version {version}") from None
    return str(version)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(
    model_name: str,
    version: str,
    *,
    port: int = 0,
    settings: Settings | None = None,
    service: str = SERVICE,
    timeout: float = 600.0,
    request_timeout: float = 120.0,
    uri: str | None = None,
) -> Served:
    """Start the scoring server for ``models:/model_name/version`` and wait until it answers
    ``/ping`` (the model is downloaded and loaded by then). ``port`` 0 picks a free one. Raises
    ServeError with the server's last log lines when it exits or does not answer in time; then
    nothing is left running."""
    settings = settings or get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if services._read_pid(settings, service) is not None:
        raise ServeError(
            f"a {service} server already runs (pid file {settings.state_dir / (service + '.pid')}); stop it first"
        )
    port = port or free_port(settings.host)
    url = f"http://{settings.host}:{port}"
    model_uri = f"models:/{model_name}/{version}"
    env = dict(os.environ)
    env.update(settings.s3_env())
    env["MLFLOW_TRACKING_URI"] = uri or tracking.tracking_uri()
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(request_timeout))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # its uvicorn is this venv's
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", settings.host, "--port", str(port), "--workers", "1"]
    log_path = settings.state_dir / f"{service}.log"
    log_path.unlink(missing_ok=True)  # the log of this start only: its tail explains a failure
    started = time.monotonic()
    pid = services.spawn(settings, service, cmd, env)
    log.info("serving %s (pid %d) at %s; loading the model from the registry", model_uri, pid, url)
    try:
        services.wait_for(lambda: _ping(url), f"scoring server for {model_uri}", timeout, log_path, pid)
    except services.ServiceError as err:
        services.stop(service, settings)
        raise ServeError(str(err)) from None
    served = Served(model_name, str(version), model_uri, url, pid, str(log_path), time.monotonic() - started)
    write_json(settings.state_dir / f"{service}.json", dataclasses.asdict(served))
    log.info("%s answers at %s after %.1f s", model_uri, url, served.seconds_to_ready)
    return served


def stop(settings: Settings | None = None, service: str = SERVICE) -> bool:
    settings = settings or get_settings()
    (settings.state_dir / f"{service}.json").unlink(missing_ok=True)
    return services.stop(service, settings)


def running(settings: Settings | None = None, service: str = SERVICE) -> dict[str, Any] | None:
    """What the server started by ``start`` serves, when it still runs."""
    settings = settings or get_settings()
    if services._read_pid(settings, service) is None:
        return None
    path = settings.state_dir / f"{service}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


EXAMPLE_REQUEST = {
    "dataframe_records": [{"instruction": "中国的首都是哪里？", "input": ""}],
    "params": {"max_new_tokens": 32, "temperature": 0.2},
}


def curl_example(url: str) -> str:
    body = json.dumps(EXAMPLE_REQUEST, ensure_ascii=False)
    return f"curl -s {url}/invocations -H 'Content-Type: application/json' -d '{body}'"


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, or the text when it is not JSON
    seconds: float


def invoke(url: str, payload: dict[str, Any], timeout: float = 120.0) -> Answer:
    """POST ``payload`` (MLflow's JSON: ``dataframe_records`` and ``params``) to /invocations."""
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    seconds = time.monotonic() - started
    text = raw.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text)
    except json.JSONDecodeError:
        body = text
    return Answer(status, body, seconds)
