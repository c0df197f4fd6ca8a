"""Tracking into the local store (no server): parent and nested runs, params, step metrics,
lineage, failure status."""

import dataclasses
import time
from pathlib import Path

import pytest

from zhllama.core import tracking
from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig


def _children(tracker: tracking.PipelineRun):
    return tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id()}'"
    )


def test_stages_nest_under_one_parent_per_pipeline_run(local_tracking: Path) -> None:
    cfg = PretrainConfig(max_steps=3)
    first = tracking.PipelineRun(run_id="pipeline-a")
    with first.stage("pretrain_stage2", cfg) as run:
        for step in (1, 2, 3):
            run.log_step({"step": step, "loss": 10.0 - step, "lr": 1e-4})
        run.log_metrics({"train_loss_last": 7.0, "data": {"train_blocks": 12}, "config": {"ignored": 1}})
    # another process (a new PipelineRun) with the same pipeline run id joins the same parent
    second = tracking.PipelineRun(run_id="pipeline-a")
    with second.stage("sft", None):
        pass
    assert second.parent_run_id() == first.parent_run_id()
    runs = {r.data.tags["mlflow.runName"]: r for r in _children(second)}
    assert set(runs) == {"pretrain_stage2", "sft"}
    pt = runs["pretrain_stage2"]
    assert pt.info.status == "FINISHED"
    # every config field is a param, lists joined
    assert set(pt.data.params) == {f.name for f in dataclasses.fields(PretrainConfig)}
    assert pt.data.params["lora_target_modules"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    history = second.client.get_metric_history(pt.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert pt.data.metrics["data.train_blocks"] == 12 and "config.ignored" not in pt.data.metrics
    # a different pipeline run gets its own parent
    assert tracking.PipelineRun(run_id="pipeline-b").parent_run_id() != first.parent_run_id()


def test_lineage_tags_on_every_run_and_backfilled(local_tracking: Path, tiny_base: Path, vocab_run: Path) -> None:
    tracker = tracking.PipelineRun(run_id="lineage")
    with tracker.stage("early", None, tracking.lineage("lineage")):
        pass  # knows neither the base model nor the tokenizer yet
    with tracker.stage(
        "later", None, tracking.lineage("lineage", base_model=tiny_base, tokenizer_dir=vocab_run / "tokenizer")
    ):
        pass
    tracker.finish()
    for run in [*_children(tracker), tracker.client.get_run(tracker.parent_run_id())]:
        tags = run.data.tags
        assert tags["zhllama.pipeline_run_id"] == "lineage"
        assert tags["zhllama.base_model_id"].startswith("base@sha256:")
        assert tags["zhllama.tokenizer_sha256"] == tracking.tokenizer_sha256(vocab_run / "tokenizer")
        assert tags["zhllama.data_dvc_md5"].endswith(".dir")
        assert len(tags["zhllama.git_commit"]) >= 40
    assert tracker.client.get_run(tracker.parent_run_id()).info.status == "FINISHED"


def test_failed_stage_marks_its_run_and_the_parent_failed(local_tracking: Path) -> None:
    tracker = tracking.PipelineRun(run_id="fails")
    with pytest.raises(ValueError, match="boom"), tracker.stage("pretrain_stage2", None) as run:
        run.log_step({"step": 1, "loss": 3.0})
        raise ValueError("boom")
    (child,) = _children(tracker)
    assert child.info.status == "FAILED"
    assert tracker.client.get_metric_history(child.info.run_id, "loss")[0].value == 3.0  # what was logged is kept
    assert tracker.client.get_run(tracker.parent_run_id()).info.status == "FAILED"
    with tracker.stage("pretrain_stage2", None):  # a retry revives the pipeline run
        pass
    assert tracker.client.get_run(tracker.parent_run_id()).info.status == "RUNNING"


def test_unreachable_server_fails_fast_with_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=r"http://127.0.0.1:9 is not reachable.*make services"):
        tracking.PipelineRun(run_id="x")
    assert time.monotonic() - started < 10


def test_model_id_changes_with_the_weights(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    before = tracking.model_id(model)
    (model / "model.safetensors").write_bytes(b"x" * 11)
    assert tracking.model_id(model) != before and before.startswith("m@sha256:")
