"""Start, check and stop the local services: a SeaweedFS object store (S3 API) and an
MLflow tracking server (sqlite backend, artifacts proxied to the object store).

Both bind to 127.0.0.1, write their data and logs under ``Settings.state_dir`` and are
stopped by the PID recorded at start. ``make services`` / ``make services-down`` and the
test fixtures call these same functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from zhllama.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

SERVICES = ("seaweedfs", "mlflow")


class ServiceError(RuntimeError):
    """A local service did not start or answer."""


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / f"{name}.pid"


def _read_pid(settings: Settings, name: str) -> int | None:
    path = _pid_file(settings, name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:
        # The S3 gateway answers 403 to anonymous requests: it is up.
        return err.code < 500
    except (urllib.error.URLError, OSError):
        return False


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_service_port(_taken: set[int] = set()) -> int:  # the default remembers ports handed out by this process
    """A free port whose +10000 partner (SeaweedFS's gRPC port) is free and valid too: for a
    private set of services (the tests', the benchmarks')."""
    import random

    rng = random.Random()
    while True:
        port = rng.randrange(21000, 45000)
        if port not in _taken and port + 10000 not in _taken and _port_free(port) and _port_free(port + 10000):
            _taken.update({port, port + 10000})
            return port


PORT_VARIABLES = (
    "ZHLLAMA_S3_PORT",
    "ZHLLAMA_WEED_MASTER_PORT",
    "ZHLLAMA_WEED_VOLUME_PORT",
    "ZHLLAMA_WEED_FILER_PORT",
    "ZHLLAMA_MLFLOW_PORT",
)


@contextlib.contextmanager
def private(state_dir: Path) -> Iterator[Settings]:
    """A SeaweedFS + MLflow pair of one's own (the tests', the benchmarks'): free ports and a
    fresh state folder, set in the environment for the block (the steps and servers it starts
    read them there), stopped and put back after it. A developer's `make services` is left alone."""
    values = {"ZHLLAMA_STATE_DIR": str(state_dir), **{name: str(free_service_port()) for name in PORT_VARIABLES}}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    settings = Settings()
    try:
        up(settings)
        yield settings
    finally:
        down(settings)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_is_up(settings: Settings) -> bool:
    return _http_ok(settings.s3_endpoint)


def mlflow_is_up(settings: Settings) -> bool:
    from zhllama.core.tracking import server_up

    return server_up(settings.mlflow_uri, timeout=2.0)


def wait_for(check, what: str, timeout: float, log_path: Path, pid: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _alive(pid):
            break  # it died: say so now rather than after the timeout
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else "(no log)"
    state = "exited" if not _alive(pid) else f"did not answer within {timeout:.0f} s"
    raise ServiceError(f"{what} {state}; last log lines from {log_path}:\n{tail}")


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def spawn(settings: Settings, name: str, cmd: list[str], env: dict[str, str]) -> int:
    log_path = settings.state_dir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=settings.state_dir,
            start_new_session=True,  # its own process group, so stop() can take the children too
        )
    _pid_file(settings, name).write_text(str(proc.pid))
    return proc.pid


def _identities(settings: Settings) -> Path:
    path = settings.state_dir / "s3-identities.json"
    config = {
        "identities": [
            {
                "name": "zhllama",
                "credentials": [{"accessKey": settings.s3_access_key, "secretKey": settings.s3_secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def s3_client(settings: Settings | None = None):
    import boto3
    from botocore.config import Config

    settings = settings or get_settings()
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 10, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


def ensure_buckets(settings: Settings) -> None:
    client = s3_client(settings)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in (settings.mlflow_bucket, settings.dvc_bucket, settings.checkpoint_bucket):
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
            log.info("created bucket s3://%s", bucket)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def start_seaweedfs(settings: Settings, timeout: float = 60) -> None:
    if s3_is_up(settings):
        log.info("object store already answers at %s", settings.s3_endpoint)
        ensure_buckets(settings)  # one started by older code may lack a bucket added since
        return
    data_dir = settings.state_dir / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)  # weed refuses to start without it
    cmd = [
        _bin("weed"),
        "server",
        f"-ip={settings.host}",
        f"-ip.bind={settings.host}",
        f"-dir={data_dir}",
        f"-master.dir={data_dir}",
        f"-master.port={settings.weed_master_port}",
        f"-volume.port={settings.weed_volume_port}",
        "-volume.max=0",
        "-master.volumeSizeLimitMB=256",
        "-filer",
        f"-filer.port={settings.weed_filer_port}",
        "-s3",
        f"-s3.port={settings.s3_port}",
        f"-s3.config={_identities(settings)}",
        # Fixed-port extras (Iceberg 8181, Lance 9101) would clash between two instances; phoning home is off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    pid = spawn(settings, "seaweedfs", cmd, dict(os.environ))
    log.info("started SeaweedFS (pid %d), waiting for %s", pid, settings.s3_endpoint)
    wait_for(lambda: s3_is_up(settings), "SeaweedFS S3 gateway", timeout, settings.state_dir / "seaweedfs.log", pid)
    # The gateway answers before the filer can take writes; retry bucket creation briefly.
    deadline = time.monotonic() + timeout
    while True:
        try:
            ensure_buckets(settings)
            return
        except Exception as err:  # botocore raises many kinds while the filer warms up
            if time.monotonic() > deadline:
                raise ServiceError(f"object store at {settings.s3_endpoint} refused bucket creation: {err}") from err
            time.sleep(1)


def start_mlflow(settings: Settings, timeout: float = 180) -> None:
    if mlflow_is_up(settings):
        log.info("MLflow already answers at %s", settings.mlflow_uri)
        return
    env = dict(os.environ)
    env.update(settings.s3_env())
    env.update(
        {
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{settings.state_dir / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{settings.mlflow_bucket}",
            "MLFLOW_HOST": settings.host,
            "MLFLOW_PORT": str(settings.mlflow_port),
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        }
    )
    pid = spawn(settings, "mlflow", ["bash", str(settings.mlflow_server_script)], env)
    log.info("started MLflow (pid %d), waiting for %s (this takes ~30-40 s)", pid, settings.mlflow_uri)
    wait_for(lambda: mlflow_is_up(settings), "MLflow tracking server", timeout, settings.state_dir / "mlflow.log", pid)


def up(settings: Settings | None = None) -> Settings:
    settings = settings or get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    start_seaweedfs(settings)
    start_mlflow(settings)
    return settings


def stop(name: str, settings: Settings | None = None, timeout: float = 8) -> bool:
    """Stop one service by the PID it was started with; True when something was stopped."""
    settings = settings or get_settings()
    pid = _read_pid(settings, name)
    if pid is None:
        _pid_file(settings, name).unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _alive(pid)  # reaps it when it is this process's exited child (a zombie still counts in its group)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    _pid_file(settings, name).unlink(missing_ok=True)
    log.info("stopped %s (pid %d)", name, pid)
    return True


def down(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    for name in reversed(SERVICES):
        stop(name, settings)


def status(settings: Settings | None = None) -> dict[str, dict[str, object]]:
    settings = settings or get_settings()
    return {
        "seaweedfs": {"pid": _read_pid(settings, "seaweedfs"), "url": settings.s3_endpoint, "up": s3_is_up(settings)},
        "mlflow": {"pid": _read_pid(settings, "mlflow"), "url": settings.mlflow_uri, "up": mlflow_is_up(settings)},
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = argv if argv is not None else sys.argv[1:]
    action = args[0] if args else "status"
    if action == "up":
        settings = up()
        buckets = ", ".join((settings.mlflow_bucket, settings.dvc_bucket, settings.checkpoint_bucket))
        print(f"object store: {settings.s3_endpoint}  (buckets {buckets})")
        print(f"MLflow:       {settings.mlflow_uri}")
    elif action == "down":
        down()
    elif action == "status":
        report = status()
        print(json.dumps(report, indent=2))
        return 0 if all(service["up"] for service in report.values()) else 1
    else:
        print("usage: python -m zhllama.core.services up|down|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
