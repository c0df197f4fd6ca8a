"""The whole DAG through kfp.local on tiny settings, against the real MLflow server: it
registers a champion, nests every step's run under one parent, and a second run with nothing
changed comes entirely from the cache. Then retrain-if-changed, both ways."""

import subprocess
import sys
import uuid

import pytest

from tests.conftest import TINY_PRESET
from zhllama.core import registry, tracking
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

pytestmark = [pytest.mark.services, pytest.mark.slow]

# configs/tiny.yaml as pipeline arguments, few SFT steps: the DAG is under test here; PT checkpoints every 5 steps.
# Two corpus files: the tokenize fan-out runs two tasks, collected into each PT step.
TINY = {
    **RECIPE.preset_arguments(TINY_PRESET),
    "pt_max_steps": 40,  # long enough for the container test to kill a PT step between checkpoints
    "pt_save_steps": 5,
    "sft_max_steps": 2,
    "pt_corpus_files": ["corpus/train.txt", "corpus/valid.txt"],
}
STEPS = {
    "prerequisites",
    "data",
    "base",
    "vocab",
    "tokenize",
    "pretrain",
    "merge",
    "sft",
    "evaluate",
    "register",
    "serve-smoke",
}


def test_first_run_trains_every_step_and_registers_a_champion(local_runs, server_tracking) -> None:
    name, (first, _) = local_runs
    ran = {step.rsplit("-", 1)[0] if step[-1].isdigit() else step for step in first["step_seconds"]}
    assert STEPS - {"base"} <= ran | set(first["cached_steps"])  # base may be cached from an earlier run of these tests
    assert (
        first["registered"]["champion"] == first["registered"]["latest_version"] == "1"
    )  # a new model name: its first version
    assert set(first["registered"]["latest_aliases"]) == {"challenger", "champion"}
    assert first["report"] and first["report"].endswith("report")
    tracker = tracking.PipelineRun(run_id=first["pipeline_run_id"])
    parent = tracker.client.get_run(tracker.parent_run_id())
    assert parent.info.status == "FINISHED" and "final_bits_per_char" in parent.data.metrics
    children = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {"vocab", "pretrain_stage2", "merge_pt", "sft", "merge_final", "evaluate", "register"} <= {
        r.data.tags["mlflow.runName"] for r in children
    }
    # the ablation ran (on by default): PT with the base vocabulary only, merged, scored beside PT-merged
    assert {"pretrain_base_vocab", "merge_base_vocab"} <= {r.data.tags["mlflow.runName"] for r in children}
    assert "pt_base_vocab_bits_per_char" in parent.data.metrics and "task_majority_share" in parent.data.metrics
    # the fan-out: a tokenize loop per tokenizer (merged, and the base's for the ablation; kfp.local
    # names every iteration after its task), each PT step trained on both files' shards
    assert len({s for s in (*first["step_seconds"], *first["cached_steps"]) if s.startswith("tokenize")}) == 2
    for pt_name in ("pretrain_stage2", "pretrain_base_vocab"):
        pt_run = next(r for r in children if r.data.tags["mlflow.runName"] == pt_name)
        assert pt_run.data.metrics.get("data.shards") == 2, pt_name
    champion = registry.champion_version(tracker.client, name)
    assert champion.tags["zhllama.pipeline_run_id"] == first["pipeline_run_id"]


def test_second_run_with_nothing_changed_is_all_cache(local_runs) -> None:
    _, (first, second) = local_runs
    assert set(second["step_seconds"]) == {"prerequisites"}  # the only uncached step: the cheap checks
    assert {s.rsplit("-", 1)[0] if s[-1].isdigit() else s for s in second["cached_steps"]} == STEPS - {"prerequisites"}
    assert second["total_seconds"] < 30 < first["total_seconds"]
    # each stage's own time comes from its MLflow run: every stage has one in the first run, none in the second
    stages = {"base", "vocab", "pretrain_stage2", "merge_pt", "sft", "merge_final", "evaluate", "register"}
    assert stages <= set(first["stage_seconds"]) and all(s > 0 for s in first["stage_seconds"].values())
    # a step is its stage plus start-up
    assert sum(first["stage_seconds"].values()) < sum(first["step_seconds"].values())
    assert second["stage_seconds"] == {}
    assert second["registered"]["latest_version"] == first["registered"]["latest_version"]  # nothing registered twice


def _retrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zhllama.cli", "retrain-if-changed", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_retrain_if_changed_does_nothing_when_the_champion_has_this_data(local_runs, server_tracking) -> None:
    name, _ = local_runs
    done = _retrain("--model_name", name, "--host", "http://kubeflow.invalid", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "nothing submitted" not in done.stdout


def test_retrain_if_changed_submits_when_the_data_differs(local_runs, server_tracking) -> None:
    name, _ = local_runs
    client = tracking.client()
    champion = registry.champion_version(client, name)
    client.set_model_version_tag(
        name, champion.version, "zhllama.data_dvc_md5", "0" * 32 + ".dir"
    )  # trained on older data
    done = _retrain("--model_name", name, "--host", "http://kubeflow.invalid", "--data_revision", "abc123", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert (
        "data changed" in done.stdout
        and '"data_revision": "abc123"' in done.stdout
        and "dry run: nothing submitted" in done.stdout
    )
    no_champion = _retrain("--model_name", f"never-{uuid.uuid4().hex[:6]}", "--dry-run")
    assert (
        no_champion.returncode == 0
        and "data changed" in no_champion.stdout
        and "would run the pipeline locally" in no_champion.stdout
    )
