"""Run this recipe's whole pipeline on this machine with ``kfp.local`` (``make run``), through the
platform's KFP helpers (zhllama/core/kfp_local.py).

``make run``: every step runs as a subprocess of this Python, from the Python-defined DAG.
``make run-containers`` (``--containers``): the checked-in compiled YAML (what a Kubeflow UI user
uploads), every step in its own container from the image ``make images`` built, as the image's
non-root user. Both run on the embedded default data and base model, against the local MLflow
server when ``make services`` runs. kfp.local caches each step under ``.kfp_cache`` by component,
command, arguments and the URIs of its input artifacts: with nothing changed the whole DAG is
reused. At the end it prints each step's wall time, each stage's own time (its MLflow run) and
where to look.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from zhllama.core import kfp_local
from zhllama.core.kfp_local import StepFailed
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

__all__ = ["StepFailed", "main", "run_local"]

log = logging.getLogger("zhllama.run")

OUTPUTS = PROJECT_ROOT / ".kfp_outputs"
CACHE = PROJECT_ROOT / ".kfp_cache"
COMPILED = Path(__file__).resolve().parent / "chinese_llama_alpaca.yaml"
MOUNTED_BASE_TOKENIZER = "/opt/zhllama-inputs/base-tokenizer.model"
README_BEGIN = "<!-- default-run: written by `make run` from the run's own evaluation; do not edit -->"
README_END = "<!-- /default-run -->"


def run_local(
    preset: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    caching: bool = True,
    pipeline_root: Path = OUTPUTS,
    cache_root: Path = CACHE,
    containers: bool = False,
    pipeline_yaml: Path = COMPILED,
) -> dict[str, Any]:
    """Run the pipeline through kfp.local; returns the step times, the stages' own times, cache
    hits and where to look. ``containers``: run ``pipeline_yaml`` with every step in a container."""
    from kfp import local

    from zhllama.core import tracking

    arguments = RECIPE.preset_arguments(preset) if preset else {}
    arguments.update(overrides or {})
    arguments.setdefault("data_md5", tracking.data_dvc_md5())  # new data, new cache key
    if os.environ.get("MLFLOW_TRACKING_URI"):
        arguments.setdefault("mlflow_tracking_uri", os.environ["MLFLOW_TRACKING_URI"])
    run_id = os.environ.setdefault("ZHLLAMA_PIPELINE_RUN_ID", f"kfp-local-{time.strftime('%Y%m%d-%H%M%S')}")
    pipeline_root, cache_root = Path(pipeline_root).resolve(), Path(cache_root).resolve()  # containers mount them as is
    if containers:
        pipeline, runner = (
            kfp_local.load_with_local_tags(pipeline_yaml),
            _docker_runner(pipeline_root, run_id, arguments),
        )
    else:
        from pipelines.chinese_llama_alpaca import build_pipeline

        pipeline = build_pipeline(code_version=kfp_local.code_version(PROJECT_ROOT))
        runner = local.SubprocessRunner(use_venv=False)
    timings = kfp_local.run_pipeline(
        pipeline, arguments, runner, caching=caching, pipeline_root=pipeline_root, cache_root=cache_root
    )
    return {
        "pipeline_run_id": run_id,
        **timings,
        "stage_seconds": _stage_seconds(run_id, arguments),
        "arguments": arguments,
        **where_to_look(run_id, arguments, pipeline_root),
    }


def _docker_runner(pipeline_root: Path, run_id: str, arguments: dict[str, Any]):
    """The environment a cluster's secrets and downward API give a step, and the base tokenizer
    `make run` uses here (the shared LLaMA one, or $ZHLLAMA_BASE_TOKENIZER) mounted read-only; the
    image's own fallback (the mistral-common wheel's) needs no mount."""
    from zhllama.core.settings import get_settings
    from zhllama.recipes.chinese_llama_alpaca.vocab import BASE_TOKENIZER_ENV, resolve_base_tokenizer

    env = {**get_settings().s3_env(), "ZHLLAMA_PIPELINE_RUN_ID": run_id}
    if uri := arguments.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = uri
    mounts = {}
    tokenizer = resolve_base_tokenizer().resolve()
    if not str(tokenizer).startswith(sys.prefix):
        mounts[str(tokenizer)] = MOUNTED_BASE_TOKENIZER
        env[BASE_TOKENIZER_ENV] = MOUNTED_BASE_TOKENIZER
    return kfp_local.docker_runner(pipeline_root, env, mounts)


def _stage_seconds(run_id: str, arguments: dict[str, Any]) -> dict[str, float]:
    """Each stage's own time in this pipeline run, from its MLflow run ({} when MLflow cannot say)."""
    from zhllama.core import tracking

    try:
        return tracking.PipelineRun(run_id=run_id, experiment=arguments.get("mlflow_experiment")).stage_seconds()
    except tracking.TrackingError:
        return {}


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
    evaluations = sorted(pipeline_root.rglob("evaluation/metrics.json"), key=lambda p: p.stat().st_mtime)
    found["evaluation_metrics"] = str(evaluations[-1]) if evaluations else None
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
            "decision": latest.tags.get(registry.DECISION_TAG) if latest else None,
            "reason": latest.tags.get("promotion.reason") if latest else None,
        }
    except tracking.TrackingError as err:
        found["mlflow_run"] = str(err)
    return found


def verdict_lines(evaluation: dict[str, Any] | None) -> list[str]:
    """The headline of the evaluation, from the evaluate step's metrics: accuracy against the
    majority baseline, and bits/char after SFT against after PT."""
    flat = {m["name"]: m["numberValue"] for m in (evaluation or {}).get("metrics", []) if "numberValue" in m}
    flat = flat or (evaluation or {})
    lines = []
    if {"task_accuracy_loglik", "task_majority_share"} <= set(flat):
        acc, majority = flat["task_accuracy_loglik"], flat["task_majority_share"]
        word = "beat" if acc > majority else "DID NOT BEAT"
        lines.append(
            f"task             accuracy {acc:.3f}: {word} the majority baseline {majority:.3f} ({acc - majority:+.3f})"
        )
    if {"final_bits_per_char", "pt_merged_bits_per_char"} <= set(flat):
        ratio = flat["final_bits_per_char"] / flat["pt_merged_bits_per_char"] - 1
        lines.append(
            f"language model   {flat['final_bits_per_char']:.3f} bits/char after SFT, {flat['pt_merged_bits_per_char']:.3f} "
            f"after PT ({ratio:+.1%})"
            + (
                f"; base vocabulary only: {flat['pt_base_vocab_bits_per_char']:.3f}"
                if "pt_base_vocab_bits_per_char" in flat
                else ""
            )
        )
    return lines


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
    parser.add_argument(
        "--readme",
        default=None,
        help="rewrite this file's default-run block (between its markers) with the run's own figures",
    )
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
    print("  steps, wall time (kfp.local)")
    for step, seconds in result["step_seconds"].items():
        print(f"    {step:<26} {seconds:7.1f} s")
    if result.get("stage_seconds"):
        print("  stages, their own work (their MLflow runs)")
        for stage, seconds in result["stage_seconds"].items():
            print(f"    {stage:<26} {seconds:7.1f} s")
    if result["cached_steps"]:
        print(f"  cached (reused): {', '.join(result['cached_steps'])}")
    print(f"MLflow run       {result.get('mlflow_run')}")
    print(f"report           {result.get('report')}")
    for line in verdict_lines(result.get("evaluation")):
        print(line)
    reg = result.get("registered") or {}
    if reg:
        print(
            f"registered       {reg['model']} version {reg['latest_version']} aliases {reg['latest_aliases']}; "
            f"champion = version {reg['champion']} (models:/{reg['model']}@champion at {reg['tracking_uri']})"
        )
        if reg.get("decision"):
            print(f"promotion        {reg['decision']}: {reg['reason']}")
        if reg["latest_version"] and "champion" not in reg["latest_aliases"]:
            print(
                f"NOT CHAMPION     version {reg['latest_version']} did not take champion"
                + (f"; champion stays version {reg['champion']}" if reg["champion"] else "; there is no champion")
            )
    if args.summary:
        Path(args.summary).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    if args.readme and result.get("evaluation_metrics"):
        update_readme(Path(args.readme), result)
        print(f"readme           {args.readme}: the default-run block now shows this run's figures")
    return 0


def update_readme(path: Path, result: dict[str, Any]) -> None:
    """Replace the block between README_BEGIN and README_END with this run's figures (written whole)."""
    from zhllama.core.io import atomic_file, read_json
    from zhllama.recipes.chinese_llama_alpaca.report import readme_block

    text = path.read_text(encoding="utf-8")
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} block to rewrite")
    reg = result.get("registered") or {}
    block = readme_block(
        read_json(result["evaluation_metrics"]),
        {
            "total_seconds": result["total_seconds"],
            "pipeline_run_id": result["pipeline_run_id"],
            "decision": reg.get("decision"),
            "reason": reg.get("reason"),
            "steps": result["step_seconds"],
        },
    )
    with atomic_file(path) as handle:
        handle.write(text[: begin + len(README_BEGIN)] + "\n" + block + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
