"""Run the whole pipeline on this machine with ``kfp.local`` (``make run``).

Every step runs as a subprocess of this Python (no containers, no cluster), on the embedded
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

import yaml

from pipelines.parameters import arguments_from_preset
from zhllama.settings import PROJECT_ROOT

log = logging.getLogger("zhllama.run")

OUTPUTS = PROJECT_ROOT / ".kfp_outputs"
CACHE = PROJECT_ROOT / ".kfp_cache"


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

    def filter(self, record: logging.LogRecord) -> bool:
        self._note(record)
        return True

    def _note(self, record: logging.LogRecord) -> None:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if match := self.START.search(message):
            self.started[match.group(1)] = record.created
        elif (match := self.END.search(message)) and match.group(1) in self.started:
            self.seconds[match.group(1)] = record.created - self.started[match.group(1)]
        elif match := self.HIT.search(message):
            self.cached.append(match.group(1))


def run_local(preset: str | Path | None = None, overrides: dict[str, Any] | None = None, caching: bool = True,
              pipeline_root: Path = OUTPUTS, cache_root: Path = CACHE) -> dict[str, Any]:
    """Run the pipeline through kfp.local; returns the step times, cache hits and where to look."""
    from kfp import local

    from pipelines.chinese_llama_alpaca import build_pipeline
    from zhllama import tracking

    arguments = arguments_from_preset(yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {}) if preset else {}
    arguments.update(overrides or {})
    arguments.setdefault("data_md5", tracking.data_dvc_md5())  # new data, new cache key
    if os.environ.get("MLFLOW_TRACKING_URI"):
        arguments.setdefault("mlflow_tracking_uri", os.environ["MLFLOW_TRACKING_URI"])
    run_id = os.environ.setdefault("ZHLLAMA_PIPELINE_RUN_ID", f"kfp-local-{time.strftime('%Y%m%d-%H%M%S')}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), enable_caching=caching,
               cache_root=str(cache_root))
    timer = StepTimer()
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO))  # kfp.local reports steps and cache hits at INFO
    root.addFilter(timer)
    started = time.perf_counter()
    try:
        build_pipeline(code_version=code_version())(**arguments)
    finally:
        root.removeFilter(timer)
        root.setLevel(level)
    total = time.perf_counter() - started
    return {"pipeline_run_id": run_id, "total_seconds": total, "step_seconds": timer.seconds, "cached_steps": timer.cached,
            "arguments": arguments, **where_to_look(run_id, arguments, pipeline_root)}


def code_version() -> str:
    """A hash of the library, components and pipeline sources: edited code re-runs the steps."""
    from zhllama.io import sha256_files

    files = sorted(p for folder in ("zhllama", "components", "pipelines") for p in (PROJECT_ROOT / folder).rglob("*.py"))
    return sha256_files(files)[:16]


def where_to_look(run_id: str, arguments: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    from zhllama import registry, tracking
    from zhllama.config import RegisterConfig

    reports = sorted(pipeline_root.rglob("report"), key=lambda p: p.stat().st_mtime)
    found: dict[str, Any] = {"report": str(reports[-1]) if reports else None}  # the newest one written
    try:
        tracker = tracking.Tracker(run_id=run_id, experiment=arguments.get("mlflow_experiment"))
        parent = tracker._find_parent()
        found["mlflow_run"] = tracker.run_url(parent) if parent else "(no new MLflow run: every step came from the cache)"
        name = arguments.get("register_model_name", RegisterConfig().model_name)
        champion = registry.champion_version(tracker.client, name)
        versions = tracker.client.search_model_versions(f"name = '{name}'")
        latest = max(versions, key=lambda v: int(v.version), default=None)
        latest = tracker.client.get_model_version(name, latest.version) if latest else None  # search results carry no aliases
        found["registered"] = {"model": name, "latest_version": latest.version if latest else None,
                               "latest_aliases": list(latest.aliases) if latest else [], "champion": champion.version if champion else None,
                               "tracking_uri": tracker.uri}
    except tracking.TrackingError as err:
        found["mlflow_run"] = str(err)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(PROJECT_ROOT / "configs" / "default.yaml"))
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter (JSON value or text)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--summary", default=None, help="also write the timings as JSON here")
    parser.add_argument("--pipeline-root", default=str(OUTPUTS), help="where the steps' artifacts go")
    parser.add_argument("--cache-root", default=str(CACHE), help="kfp.local's cache of finished steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipelines.submit import parse_params

    result = run_local(args.preset, parse_params(args.param), caching=not args.no_cache, pipeline_root=Path(args.pipeline_root),
                       cache_root=Path(args.cache_root))
    print("\n== zhllama pipeline (kfp.local) ==")
    print(f"pipeline run     {result['pipeline_run_id']}   total {result['total_seconds']:.1f} s")
    for step, seconds in result["step_seconds"].items():
        print(f"  {step:<28} {seconds:7.1f} s")
    if result["cached_steps"]:
        print(f"  cached (reused): {', '.join(result['cached_steps'])}")
    print(f"MLflow run       {result.get('mlflow_run')}")
    print(f"report           {result.get('report')}")
    reg = result.get("registered") or {}
    if reg:
        print(f"registered       {reg['model']} version {reg['latest_version']} aliases {reg['latest_aliases']}; "
              f"champion = version {reg['champion']} (models:/{reg['model']}@champion at {reg['tracking_uri']})")
    if args.summary:
        Path(args.summary).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
