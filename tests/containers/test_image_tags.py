"""Image tags: `zhllama submit --image-tag` names exactly the tag CI pushed and refuses one the
registry does not have, checked against a real registry (Debian's docker-registry, the
distribution server) on 127.0.0.1 with an image pushed by the real engine; and the CI workflow
builds, pushes and submits under one tag scheme."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.containers.conftest import docker
from zhllama.core.settings import PROJECT_ROOT

pytestmark = [pytest.mark.containers, pytest.mark.slow]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry (Debian's distribution server) is not installed: make setup-containers")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path_factory.mktemp("registry")
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _push_tiny_image(engine: dict, tag: str, tmp_path) -> None:
    """A one-file image, imported and pushed (docker trusts 127.0.0.0/8 over plain HTTP)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "tiny.tar").write_bytes(buffer.getvalue())
    assert docker(engine, "import", str(tmp_path / "tiny.tar"), tag).returncode == 0
    pushed = docker(engine, "push", tag)
    assert pushed.returncode == 0, pushed.stderr


def _submit(registry: str, tag: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZHLLAMA_IMAGE_TAG"} | {
        "ZHLLAMA_IMAGE_REGISTRY": f"{registry}/zhllama"
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "zhllama.cli",
            "submit",
            "--host",
            "http://kubeflow.invalid",
            "--image-tag",
            tag,
            "--dry-run",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_submit_names_the_pushed_tag_and_refuses_a_missing_one(engine, registry, tmp_path) -> None:
    from zhllama.core.containers import image_in_registry

    _push_tiny_image(engine, f"{registry}/zhllama/zhllama-cpu:abc123", tmp_path)
    assert image_in_registry(f"{registry}/zhllama/zhllama-cpu:abc123")[0] is True
    assert image_in_registry(f"{registry}/zhllama/zhllama-cpu:nope")[0] is False
    assert image_in_registry("registry.invalid/zhllama/zhllama-cpu:abc123")[0] is None  # cannot tell: not refused

    ok = _submit(registry, "abc123")
    assert ok.returncode == 0, ok.stderr[-2000:]
    plan = json.loads(ok.stdout[: ok.stdout.rindex("}") + 1])
    assert plan["images"] == {f"{registry}/zhllama/zhllama-cpu:abc123": "present"}
    compiled = Path(plan["package"]).read_text(encoding="utf-8")
    assert f"image: {registry}/zhllama/zhllama-cpu:abc123" in compiled and ":0.1.0" not in compiled

    missing = _submit(registry, "not-pushed")
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert f"image {registry}/zhllama/zhllama-cpu:not-pushed does not exist" in missing.stderr
