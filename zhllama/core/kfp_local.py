"""Pipelines on this machine through ``kfp.local``: the platform's half of ``make run``.

A Python-defined pipeline runs with every step as a subprocess (``SubprocessRunner``); a
compiled YAML runs with every step in its own container through ``DockerRunner`` on the host
network, as the image's non-root user. kfp.local reports a step's wall time and its cache hits
only in its log lines, so ``StepTimer`` reads them there; what each stage itself took comes
from its MLflow run (``tracking.PipelineRun.stage_seconds``). Nothing here knows a recipe.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StepFailed(RuntimeError):
    """A step of a local run failed; the message is its own one-line error."""


class StepTimer(logging.Filter):
    """Wall time per step and the cache hits, from kfp.local's own log lines (it reports them
    nowhere else). A filter on the root logger, because kfp.local swaps the root handlers while
    a task runs."""

    START = re.compile(r"Executing task '?([\w-]+)")
    END = re.compile(r"Task '?([\w-]+)'? finished with status")
    HIT = re.compile(r"Task ([\w-]+) cache hit")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self._note(record)
        return True

    def _note(self, record: logging.LogRecord) -> None:
        message = ANSI.sub("", record.getMessage())
        if match := self.START.search(message):
            self.started[match.group(1)] = record.created
        elif (match := self.END.search(message)) and match.group(1) in self.started:
            self.seconds[match.group(1)] = record.created - self.started[match.group(1)]
        elif match := self.HIT.search(message):
            self.cached.append(match.group(1))


def failed_task(err: BaseException) -> str:
    """The task kfp.local's pipeline error names (``Inner task failed: 'x'``), or ``a step``."""
    match = re.search(r"Inner task failed: '([\w-]+)'", ANSI.sub("", str(err)))
    return match.group(1) if match else "a step"


def run_pipeline(
    pipeline: Callable[..., Any],
    arguments: dict[str, Any],
    runner: Any,
    *,
    caching: bool,
    pipeline_root: Path,
    cache_root: Path,
) -> dict[str, Any]:
    """Run ``pipeline(**arguments)`` with kfp.local; returns the total and per-step wall times
    and the cached steps, or raises ``StepFailed`` with the failed step's own error line."""
    from kfp import local

    local.init(runner=runner, pipeline_root=str(pipeline_root), enable_caching=caching, cache_root=str(cache_root))
    timer = StepTimer()
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO))  # kfp.local reports steps and cache hits at INFO
    root.addFilter(timer)
    started = time.perf_counter()
    _container_errors[:] = []
    try:
        pipeline(**arguments)
    except RuntimeError as err:
        if "finished with status" not in str(err):
            raise
        reason = _container_errors[0] if _container_errors else ANSI.sub("", str(err))
        raise StepFailed(f"step {failed_task(err)} failed: {reason}") from None
    finally:
        root.removeFilter(timer)
        root.setLevel(level)
    return {"total_seconds": time.perf_counter() - started, "step_seconds": timer.seconds, "cached_steps": timer.cached}


# --- containers ------------------------------------------------------------------------------------

_container_errors: list[str] = []  # the last error line of each failed container, for StepFailed
_runner_env: dict[str, str] = {}  # kfp.local replaces the runner's environment with a task's own env: both are kept
_runner_mounts: dict[str, dict[str, str]] = {}  # read-only host files the steps need besides the pipeline root


def load_with_local_tags(pipeline_yaml: Path):
    """A compiled pipeline with its zhllama images named by the local code tag
    (``<version>-<code hash>``, what ``make images`` tagged): the YAML is otherwise the one on
    disk, and a code change is a new image, so a new cache key for every step."""
    from kfp import components

    from zhllama.core.containers import code_version as image_code_version
    from zhllama.core.containers import local_tag, retag

    codes = {kind: image_code_version(kind=kind) for kind in ("cpu", "cuda")}
    try:
        text = retag(
            Path(pipeline_yaml).read_text(encoding="utf-8"),
            lambda repository: local_tag(repository + ":x", codes["cuda" if repository.endswith("-cuda") else "cpu"]),
        )
    except ValueError as err:
        raise StepFailed(f"{pipeline_yaml}: {err}") from None
    return components.load_component_from_text(text)


def docker_runner(pipeline_root: Path, env: dict[str, str], mounts: dict[str, str] | None = None):
    """kfp.local's DockerRunner on the host network (the services listen on 127.0.0.1) with
    ``env`` (what a cluster's secrets and downward API give a step) and read-only ``mounts``
    (host path -> container path), as the image's non-root user (or this user's uid, group 0,
    when not root); the pipeline root is made writable for it."""
    from kfp import local
    from kfp.local import docker_task_handler

    from zhllama.core import containers

    os.environ["DOCKER_HOST"] = containers.engine_env()["DOCKER_HOST"]
    docker_task_handler.run_docker_container = run_container
    _runner_mounts.clear()
    _runner_mounts.update({host: {"bind": inside, "mode": "ro"} for host, inside in (mounts or {}).items()})
    _runner_env.clear()
    _runner_env.update(env)
    uid = containers.STEP_UID if os.geteuid() == 0 else os.getuid()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(pipeline_root, uid, 0)
    pipeline_root.chmod(0o775)
    return local.DockerRunner(network_mode="host", environment=env, user=f"{uid}:0")


def run_container(client, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any) -> int:
    """kfp.local's container run, with the exit code kept: kfp 2.17.0 starts containers with
    auto-remove and reads the exit code afterwards, so a container removed first counts as a
    success (and podman's API loses it outright). Here the container is removed only after
    its code is read. A missing image fails at once, naming the target that builds it. A task
    with an env of its own keeps the runner's environment too (kfp.local would replace it)."""
    import codecs

    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise StepFailed(f"image {image} is not built: run `make images` (it is tagged with the code's hash)") from None
    run_args["environment"] = {**_runner_env, **(run_args.get("environment") or {})}
    container = client.containers.run(
        image=image,
        command=command,
        detach=True,
        stdout=True,
        stderr=True,
        volumes={**volumes, **_runner_mounts},
        auto_remove=False,
        **run_args,
    )
    decoder, last_error = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        pending = ""
        for chunk in container.logs(stream=True, follow=True):
            text = pending + decoder.decode(chunk)
            *lines, pending = text.split("\n")
            for line in lines:
                print(line)
                if re.match(r"^(error: |[\w.]*(Error|Exception)\b: )", line):
                    last_error = line
        if pending:
            print(pending)
        code = int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)
    if code != 0:
        _container_errors.append(last_error or f"its container exited with code {code}")
    return code


def code_version(root: Path, folders: tuple[str, ...] = ("zhllama", "components", "pipelines")) -> str:
    """A hash of the Python sources under ``folders``: edited code re-runs the steps."""
    from zhllama.core.io import sha256_files

    return sha256_files(sorted(p for folder in folders for p in (root / folder).rglob("*.py")))[:16]
