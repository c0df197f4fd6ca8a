"""train_launcher=trainjob for real: the pretrain component's step submits a 2-node TrainJob
through the kubeflow SDK's container backend on the project's Docker engine (two containers of
this code's image, gloo, the nodes' inputs and output through the real object store, MLflow on
the real server), and its loss trajectory follows the one-process in-pod run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containers, pytest.mark.services, pytest.mark.slow]

PARAMS = {
    "block_size": 64,
    "max_steps": 5,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "lora_dropout": 0.0,
    "save_steps": 2,
    "eval_steps": 0,
    "logging_steps": 1,
    "num_threads": 1,
    "validation_split_percentage": 0.0,
    "mlflow_experiment": "trainjob-experiment",
}


def _shard(tmp_path: Path, vocab_run: Path, small_corpus):
    from kfp import dsl

    from components.tokenize import tokenize_cpu

    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "train.txt").write_text(small_corpus["train"].read_text(encoding="utf-8"), encoding="utf-8")
    shard = dsl.Dataset(name="shard", uri=str(tmp_path / "shard"))
    tokenize_cpu.python_func(
        data=dsl.Dataset(name="data", uri=str(data)), vocab=dsl.Model(name="vocab", uri=str(vocab_run)), shard=shard
    )
    return shard


def _step(tmp_path: Path, name: str, tiny_base: Path, vocab_run: Path, shard, **more) -> dict:
    from kfp import dsl

    from components.pretrain import pretrain_cpu

    started = time.perf_counter()
    pretrain_cpu.python_func(
        base_model=dsl.Model(name="base", uri=str(tiny_base)),
        vocab=dsl.Model(name="vocab", uri=str(vocab_run)),
        shards=[shard],
        run=dsl.Model(name="run", uri=str(tmp_path / name)),
        metrics=dsl.Metrics(name="metrics", uri=str(tmp_path / f"{name}-metrics")),
        **PARAMS,
        **more,
    )
    out = tmp_path / name
    return {
        "seconds": time.perf_counter() - started,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "step": json.loads((tmp_path / f"{name}-metrics").read_text()),
        "losses": [h["loss"] for h in json.loads((out / "train_log.json").read_text()) if "loss" in h],
    }


def test_two_node_trainjob_matches_one_process_and_tracks_once(
    tmp_path: Path, engine, services, server_tracking, tiny_base: Path, vocab_run: Path, small_corpus, monkeypatch
) -> None:
    from zhllama.core import tracking
    from zhllama.core.training import durable

    monkeypatch.setenv("ZHLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", f"trainjob-{tmp_path.name}")
    for key, value in services.s3_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DOCKER_HOST", engine["env"]["DOCKER_HOST"])
    shard = _shard(tmp_path, vocab_run, small_corpus)

    single = _step(
        tmp_path, "in-pod", tiny_base, vocab_run, shard, per_device_train_batch_size=4, checkpoint_uri="none"
    )
    monkeypatch.setenv("ZHLLAMA_TRAINJOB_BACKEND", "container")
    job = _step(
        tmp_path,
        "trainjob",
        tiny_base,
        vocab_run,
        shard,
        per_device_train_batch_size=2,
        train_launcher="trainjob",
        nnodes=2,
        nproc_per_node=1,
        trainjob_image=engine["image"],
        checkpoint_uri=f"s3://{services.checkpoint_bucket}/trainjob-test",
        checkpoint_run=tmp_path.name,
        checkpoint_task="pretrain",
    )
    assert job["metrics"]["world_size"] == 2 and job["metrics"]["steps"] == 5
    assert len(job["losses"]) == len(single["losses"]) == 5
    assert job["losses"] == pytest.approx(single["losses"], abs=1e-4), (single["losses"], job["losses"])
    # the job's rank 0 stored its checkpoints durably, under the step's run and task; the step,
    # done, cleared that prefix (checkpoints, staged inputs, output)
    assert job["metrics"]["checkpoint_uploads"] >= 1
    store = durable.CheckpointStore(
        durable.resolve_uri(f"s3://{services.checkpoint_bucket}/trainjob-test", tmp_path.name, "pretrain")
    )
    assert store.complete_steps() == []
    assert not store.s3.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/").get("Contents")
    assert durable.read_manifest(store.s3, store.bucket, f"{store.prefix}/trainjob/output") is None
    # one MLflow run (rank 0 of node 0), in the step's experiment, under the pipeline's parent run
    tracker = tracking.PipelineRun(run_id=f"trainjob-{tmp_path.name}", experiment="trainjob-experiment")
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id()}'"
    )
    assert [r.data.tags["mlflow.runName"] for r in runs] == ["pretrain_stage2"] * 2  # in-pod's and the job's rank 0
    print(
        f"\n2-node TrainJob (container backend) {job['seconds']:.1f} s "
        f"(staging {job['step'].get('trainjob_stage_seconds', 0):.1f} s) vs in-pod one process {single['seconds']:.1f} s"
    )


def test_a_failing_trainjob_fails_the_step_with_the_jobs_error(
    tmp_path: Path, engine, services, server_tracking, tiny_base: Path, vocab_run: Path, small_corpus, monkeypatch
) -> None:
    from zhllama.core.training import durable

    monkeypatch.setenv("ZHLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", f"trainjob-fail-{tmp_path.name}")
    for key, value in {**services.s3_env(), "DOCKER_HOST": engine["env"]["DOCKER_HOST"]}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ZHLLAMA_TRAINJOB_BACKEND", "container")
    shard = _shard(tmp_path, vocab_run, small_corpus)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)TrainJob zh-\w+-\w+ ended Failed: zhllama pretrain: error: .*no_such_proj.*exit_code=1",
    ):
        _step(
            tmp_path,
            "trainjob",
            tiny_base,
            vocab_run,
            shard,
            lora_target_modules=["no_such_proj"],  # the nodes fail: no such module to put LoRA on
            train_launcher="trainjob",
            nnodes=2,
            trainjob_image=engine["image"],
            checkpoint_uri=f"s3://{services.checkpoint_bucket}/trainjob-test",
            checkpoint_run=tmp_path.name,
            checkpoint_task="pretrain",
        )
    assert not (tmp_path / "trainjob").exists(), "a failed job left a half output"
    work = durable.resolve_uri(f"s3://{services.checkpoint_bucket}/trainjob-test", tmp_path.name, "pretrain")
    bucket, prefix = durable.parse_s3_uri(f"{work}/trainjob/output")
    assert durable.read_manifest(durable.client(), bucket, prefix) is None
    done = subprocess.run(
        [engine["cli"], "ps", "-aq", "--filter", "label=trainer.kubeflow.org/trainjob-name"],
        capture_output=True,
        text=True,
        env=engine["env"],
    )
    assert done.returncode == 0 and not done.stdout.strip(), "the failed job's containers were left"
