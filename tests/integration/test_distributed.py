"""Data-parallel training: `torchrun --nproc_per_node 2` (gloo on CPU) follows the same
loss trajectory as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _pretrain(
    cmd_prefix: list[str], out: Path, per_device: int, tiny_base: Path, vocab_run: Path, corpus: Path, cache: Path
) -> list[float]:
    args = [
        "pretrain",
        "--base_model",
        str(tiny_base),
        "--tokenizer",
        str(vocab_run / "tokenizer"),
        "--train",
        str(corpus),
        "--out",
        str(out),
        "--block_size",
        "64",
        "--max_steps",
        "5",
        "--per_device_train_batch_size",
        str(per_device),
        "--learning_rate",
        "1e-3",
        "--warmup_ratio",
        "0",
        "--lora_dropout",
        "0",
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--num_threads",
        "1",
        "--validation_split_percentage",
        "0",
    ]
    env = {**os.environ, "ZHLLAMA_CACHE_DIR": str(cache)}
    result = subprocess.run([*cmd_prefix, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [h["loss"] for h in json.loads((out / "train_log.json").read_text()) if "loss" in h]


def test_two_processes_match_one(tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus) -> None:
    bin_dir = Path(sys.executable).parent
    single = _pretrain(
        [sys.executable, "-m", "zhllama.cli"],
        tmp_path / "one",
        4,
        tiny_base,
        vocab_run,
        small_corpus["train"],
        tmp_path / "c",
    )
    torchrun = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "zhllama.cli"]
    double = _pretrain(torchrun, tmp_path / "two", 2, tiny_base, vocab_run, small_corpus["train"], tmp_path / "c")
    assert len(single) == len(double) == 5
    assert double == pytest.approx(single, abs=1e-4), f"1 process {single} vs 2 processes {double}"
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_pipeline_step_launches_torchrun_and_tracks_once(
    tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus, local_tracking: Path, monkeypatch
) -> None:
    """The pretrain component's step with nproc_per_node=2: torchrun inside, one MLflow run (rank 0),
    in the step's own experiment under the one parent (the relaunched ranks get --experiment too)."""
    from kfp import dsl

    from components.pretrain import pretrain_cpu
    from components.tokenize import tokenize_cpu
    from zhllama.core import tracking

    monkeypatch.setenv("ZHLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", "ddp-step")
    monkeypatch.setenv("MASTER_PORT", "29517")
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "train.txt").write_text(small_corpus["train"].read_text(encoding="utf-8"), encoding="utf-8")
    params = {
        "nproc_per_node": 2,
        "nnodes": 1,
        "block_size": 64,
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "save_steps": 0,
        "eval_steps": 0,
        "logging_steps": 1,
        "num_threads": 1,
        "validation_split_percentage": 0.0,
        "mlflow_experiment": "ddp-experiment",
    }
    shard = dsl.Dataset(name="shard", uri=str(tmp_path / "shard"))
    tokenize_cpu.python_func(  # the fan-out's one task: the step trains on its shard, on every rank
        data=dsl.Dataset(name="data", uri=str(data)),
        vocab=dsl.Model(name="vocab", uri=str(vocab_run)),
        shard=shard,
    )
    pretrain_cpu.python_func(
        base_model=dsl.Model(name="base", uri=str(tiny_base)),
        vocab=dsl.Model(name="vocab", uri=str(vocab_run)),
        shards=[shard],
        run=dsl.Model(name="run", uri=str(tmp_path / "run")),
        metrics=dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics")),
        **params,
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    tracker = tracking.PipelineRun(run_id="ddp-step", experiment="ddp-experiment")
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id()}'"
    )
    assert [r.data.tags["mlflow.runName"] for r in runs] == ["pretrain_stage2"]
    default = tracker.client.get_experiment_by_name("zhllama")
    assert default is None or not tracker.client.search_runs([default.experiment_id]), (
        "a rank tracked into the default experiment"
    )
