"""Run the whole pipeline on this machine with ``kfp.local``.

``make run``: every step runs as a subprocess of this Python, from the Python-defined DAG.
``make run-containers`` (``--containers``): the checked-in compiled YAML (what a Kubeflow UI user
uploads), every step in its own container from the image ``make images`` built, as the image's
non-root user, through ``kfp.local.DockerRunner`` on the host network. Both run on the embedded
default data and base model, against the local MLflow server when ``make services`` runs.
kfp.local caches each step under ``.kfp_cache`` by component, command, arguments and the URIs
of its input artifacts: a cached step hands on the same output URIs, so with nothing changed the
whole DAG is reused. At the end it prints where to look.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

log = logging.getLogger("zhllama.run")

OUTPUTS = PROJECT_ROOT / ".kfp_outputs"
CACHE = PROJECT_ROOT / ".kfp_cache"
COMPILED = Path(__file__).resolve().parent / "chinese_llama_alpaca.yaml"


class StepFailed(RuntimeError):
    """A step of a local run failed; the message is its own one-line error."""


class StepTimer(logging.Filter):
    """Wall time per step, from kfp.local's own log lines. A filter on the root logger, because
    kfp.local swaps the root handlers while a task runs."""

    START = re.compile(r"Executing task '?([\w-]+)")
    END = re.compile(r"Task '?([\w-]+)'? finished with status")
    HIT = re.compile(r"Task ([\w-]+) cache hit")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []
        self.failed: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self._note(record)
        return True

    def _note(self, record: logging.LogRecord) -> None:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if match := self.START.search(message):
            self.started[match.group(1)] = record.created
        elif (match := self.END.search(message)) and match.group(1) in self.started:
            self.seconds[match.group(1)] = record.created - self.started[match.group(1)]
            if "FAILURE" in message:
                self.failed.append(match.group(1))
        elif match := self.HIT.search(message):
            self.cached.append(match.group(1))


def run_local(
    preset: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    caching: bool = True,
    pipeline_root: Path = OUTPUTS,
    cache_root: Path = CACHE,
    containers: bool = False,
    pipeline_yaml: Path = COMPILED,
) -> dict[str, Any]:
    """Run the pipeline through kfp.local; returns the step times, cache hits and where to look.
    ``containers``: run ``pipeline_yaml`` with every step in a container (see module docstring)."""
    from kfp import local

    from zhllama.core import tracking

    arguments = RECIPE.preset_arguments(preset) if preset else {}
    arguments.update(overrides or {})
    arguments.setdefault("data_md5", tracking.data_dvc_md5())  # new data, new cache key
    if os.environ.get("MLFLOW_TRACKING_URI"):
        arguments.setdefault("mlflow_tracking_uri", os.environ["MLFLOW_TRACKING_URI"])
    run_id = os.environ.setdefault("ZHLLAMA_PIPELINE_RUN_ID", f"kfp-local-{time.strftime('%Y%m%d-%H%M%S')}")
    pipeline_root, cache_root = (
        Path(pipeline_root).resolve(),
        Path(cache_root).resolve(),
    )  # the container mounts it at the same path
    if containers:
        pipeline, runner = container_pipeline(pipeline_yaml), docker_runner(pipeline_root, run_id, arguments)
    else:
        from pipelines.chinese_llama_alpaca import build_pipeline

        pipeline, runner = build_pipeline(code_version=code_version()), local.SubprocessRunner(use_venv=False)
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
        step = timer.failed[0] if timer.failed else "a step"
        reason = _container_errors[0] if _container_errors else re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        raise StepFailed(f"step {step} failed: {reason}") from None
    finally:
        root.removeFilter(timer)
        root.setLevel(level)
    total = time.perf_counter() - started
    return {
        "pipeline_run_id": run_id,
        "total_seconds": total,
        "step_seconds": timer.seconds,
        "cached_steps": timer.cached,
        "arguments": arguments,
        **where_to_look(run_id, arguments, pipeline_root),
    }


# --- containers ------------------------------------------------------------------------------------

_container_errors: list[str] = []  # the last error line of each failed container, for StepFailed
_runner_env: dict[str, str] = {}  # kfp.local replaces the runner's environment with a task's own env: both are kept
_runner_mounts: dict[str, dict[str, str]] = {}  # read-only host files the steps need besides the pipeline root
MOUNTED_BASE_TOKENIZER = "/opt/zhllama-inputs/base-tokenizer.model"


def container_pipeline(pipeline_yaml: Path = COMPILED):
    """The compiled pipeline, with its zhllama images named by the local code tag
    (``<version>-<code hash>``, what ``make images`` tagged): the YAML is otherwise the one on
    disk, and a code change is a new image, so a new cache key for every step."""
    from kfp import components

    from components.images import retag
    from zhllama.core.containers import code_version as image_code_version
    from zhllama.core.containers import local_tag

    codes = {kind: image_code_version(kind=kind) for kind in ("cpu", "cuda")}
    try:
        text = retag(
            Path(pipeline_yaml).read_text(encoding="utf-8"),
            lambda repository: local_tag(repository + ":x", codes["cuda" if repository.endswith("-cuda") else "cpu"]),
        )
    except ValueError as err:
        raise StepFailed(f"{pipeline_yaml}: {err}") from None
    return components.load_component_from_text(text)


def docker_runner(pipeline_root: Path, run_id: str, arguments: dict[str, Any]):
    """kfp.local's DockerRunner on the host network (the services listen on 127.0.0.1), with the
    environment a cluster's secrets and downward API give a step, as the image's non-root user
    (or this user's uid, group 0, when not root); the pipeline root is made writable for it."""
    from kfp import local
    from kfp.local import docker_task_handler

    from zhllama.core import containers
    from zhllama.core.settings import get_settings

    os.environ["DOCKER_HOST"] = containers.engine_env()["DOCKER_HOST"]
    docker_task_handler.run_docker_container = run_container
    env = {**get_settings().s3_env(), "ZHLLAMA_PIPELINE_RUN_ID": run_id}
    if uri := arguments.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = uri
    # The base step takes the same base tokenizer as `make run` here (../shared's LLaMA one when it
    # is beside the checkout, or $ZHLLAMA_BASE_TOKENIZER), mounted read-only; the image's own
    # fallback (the mistral-common wheel's) needs no mount.
    from zhllama.recipes.chinese_llama_alpaca.vocab import BASE_TOKENIZER_ENV, resolve_base_tokenizer

    _runner_mounts.clear()
    tokenizer = resolve_base_tokenizer().resolve()
    if not str(tokenizer).startswith(sys.prefix):
        _runner_mounts[str(tokenizer)] = {"bind": MOUNTED_BASE_TOKENIZER, "mode": "ro"}
        env[BASE_TOKENIZER_ENV] = MOUNTED_BASE_TOKENIZER
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


def code_version() -> str:
    """A hash of the library, components and pipeline sources: edited code re-runs the steps."""
    from zhllama.core.io import sha256_files

    files = sorted(
        p for folder in ("zhllama", "components", "pipelines") for p in (PROJECT_ROOT / folder).rglob("*.py")
    )
    return sha256_files(files)[:16]


def where_to_look(run_id: str, arguments: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    from zhllama.core import registry, tracking
    from zhllama.recipes.chinese_llama_alpaca.configs import RegisterConfig

    reports = sorted(pipeline_root.rglob("report"), key=lambda p: p.stat().st_mtime)
    found: dict[str, Any] = {"report": str(reports[-1]) if reports else None}  # the newest one written
    scores = sorted(
        (p for p in pipeline_root.rglob("metrics") if p.is_file() and p.parent.name.startswith("evaluate")),
        key=lambda p: p.stat().st_mtime,
    )
    found["evaluation"] = json.loads(scores[-1].read_text(encoding="utf-8")) if scores else None
    try:
        tracker = tracking.PipelineRun(run_id=run_id, experiment=arguments.get("mlflow_experiment"))
        parent = tracker._find_parent()
        found["mlflow_run"] = (
            tracker.run_url(parent) if parent else "(no new MLflow run: every step came from the cache)"
        )
        name = arguments.get("register_model_name", RegisterConfig().model_name)
        champion = registry.champion_version(tracker.client, name)
        versions = tracker.client.search_model_versions(f"name = '{name}'")
        latest = max(versions, key=lambda v: int(v.version), default=None)
        latest = (
            tracker.client.get_model_version(name, latest.version) if latest else None
        )  # search results carry no aliases
        found["registered"] = {
            "model": name,
            "latest_version": latest.version if latest else None,
            "latest_aliases": list(latest.aliases) if latest else [],
            "champion": champion.version if champion else None,
            "tracking_uri": tracker.uri,
        }
    except tracking.TrackingError as err:
        found["mlflow_run"] = str(err)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(PROJECT_ROOT / "configs" / "default.yaml"))
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter (JSON value or text)"
    )
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--summary", default=None, help="also write the timings as JSON here")
    parser.add_argument("--pipeline-root", default=str(OUTPUTS), help="where the steps' artifacts go")
    parser.add_argument("--cache-root", default=str(CACHE), help="kfp.local's cache of finished steps")
    parser.add_argument(
        "--containers",
        action="store_true",
        help="run the compiled YAML, each step in a container (make run-containers)",
    )
    parser.add_argument("--pipeline-yaml", default=str(COMPILED), help="the compiled pipeline --containers runs")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from pipelines.submit import parse_params

    try:
        result = run_local(
            args.preset,
            parse_params(args.param),
            caching=not args.no_cache,
            pipeline_root=Path(args.pipeline_root),
            cache_root=Path(args.cache_root),
            containers=args.containers,
            pipeline_yaml=Path(args.pipeline_yaml),
        )
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"\n== zhllama pipeline (kfp.local, {'compiled YAML, steps in containers' if args.containers else 'steps as subprocesses'}) =="
    )
    print(f"pipeline run     {result['pipeline_run_id']}   total {result['total_seconds']:.1f} s")
    for step, seconds in result["step_seconds"].items():
        print(f"  {step:<28} {seconds:7.1f} s")
    if result["cached_steps"]:
        print(f"  cached (reused): {', '.join(result['cached_steps'])}")
    print(f"MLflow run       {result.get('mlflow_run')}")
    print(f"report           {result.get('report')}")
    reg = result.get("registered") or {}
    if reg:
        print(
            f"registered       {reg['model']} version {reg['latest_version']} aliases {reg['latest_aliases']}; "
            f"champion = version {reg['champion']} (models:/{reg['model']}@champion at {reg['tracking_uri']})"
        )
    if args.summary:
        Path(args.summary).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
