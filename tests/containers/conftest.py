"""The container engine and this code's image, for the container tests."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def docker(engine: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [engine["cli"], *args], capture_output=True, text=True, env=engine["env"], timeout=600, **kwargs
    )


@pytest.fixture(scope="session")
def engine():
    """The engine (the project's own is started when none answers, and stopped again) and the
    image of this checkout's code (its code tag), built when missing, as `make images` does."""
    from components.images import IMAGE_CPU
    from zhllama.core import containers

    def missing(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI runs `make setup-containers` before `make test`)")
        pytest.skip(reason)

    started = False
    host = containers.docker_host()
    if host is None:
        if not shutil.which("dockerd") and not os.access("/usr/sbin/dockerd", os.X_OK):
            missing("no container engine answers and dockerd is not installed: make setup-containers")
        host, started = containers.start_engine(), True
    image = containers.local_tag(IMAGE_CPU)
    engine = {"cli": containers.docker_cli(), "env": {**os.environ, "DOCKER_HOST": host}, "image": image}
    try:
        if docker(engine, "image", "inspect", image).returncode != 0:
            containers.build_image(IMAGE_CPU, "cpu")  # seconds when only the code changed
        yield engine
    finally:
        if started:
            containers.stop_engine()
