"""The real object store and MLflow server that `make services` starts."""

from pathlib import Path

import pytest

from zhllama.core import services as svc

pytestmark = pytest.mark.services


def test_both_services_answer(services) -> None:
    state = svc.status(services)
    assert state["seaweedfs"]["up"] and state["mlflow"]["up"]
    assert state["seaweedfs"]["pid"] and state["mlflow"]["pid"]
    buckets = {b["Name"] for b in svc.s3_client(services).list_buckets()["Buckets"]}
    assert {services.mlflow_bucket, services.dvc_bucket} <= buckets


def test_mlflow_artifacts_land_in_the_bucket(services, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(services.mlflow_uri)
    mlflow.set_experiment("services-smoke")
    note = tmp_path / "note.txt"
    note.write_text("你好")
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0)
        mlflow.log_artifact(str(note))
    pages = svc.s3_client(services).get_paginator("list_objects_v2").paginate(Bucket=services.mlflow_bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]  # the session's other tests leave >1000
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys)
    # and it comes back through the tracking server's artifact proxy
    back = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl")
    )
    assert Path(back).read_text() == "你好"


def test_services_bind_loopback_only(services) -> None:
    """Every socket the services' processes listen on is a loopback one, and the ports do not
    answer on this machine's other addresses."""
    import socket

    import psutil

    listening = []
    for name, state in svc.status(services).items():
        process = psutil.Process(state["pid"])
        for proc in (process, *process.children(recursive=True)):
            connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6 (kserve pins it)
            listening += [(name, c.laddr) for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "no listening socket found for the services"
    assert all(addr.ip in {"127.0.0.1", "::1"} for _, addr in listening), listening
    others = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    for ip in others:
        for port in (services.s3_port, services.mlflow_port):
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((ip, port)) != 0, f"{ip}:{port} answers off loopback"
