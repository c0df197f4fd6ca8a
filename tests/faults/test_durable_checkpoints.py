"""Durable checkpoints against a real object store of the test's own (SeaweedFS), stopped while
training uploads: training goes on, the upload is retried once the store is back, nothing half
written counts, and a resume takes the last whole checkpoint."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_config
from zhllama.core import services as svc
from zhllama.core.settings import Settings
from zhllama.core.training import durable

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An S3-only SeaweedFS on free ports for this module (the first test stops and starts it),
    and the standard AWS environment pointing at it, as a pipeline step has."""
    ports = {name: str(svc.free_service_port()) for name in svc.PORT_VARIABLES}
    values = {**ports, "ZHLLAMA_STATE_DIR": str(tmp_path_factory.mktemp("store") / "state")}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    settings = Settings()
    settings.state_dir.mkdir(parents=True)
    saved |= {k: os.environ.get(k) for k in settings.s3_env()}
    os.environ.update(settings.s3_env())
    svc.start_seaweedfs(settings)
    try:
        yield settings
    finally:
        svc.stop("seaweedfs", settings)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _pretrain(tmp_path: Path, fx, out: Path, uri: str, on_log=None, max_steps: int = 8):
    from zhllama.recipes.chinese_llama_alpaca.pretrain import run_pretrain

    cfg = tiny_config(
        "pretrain", max_steps=max_steps, save_steps=1, save_total_limit=2, num_threads=1, lora_dropout=0.05
    )
    return run_pretrain(
        fx["base"],
        fx["tokenizer"],
        [fx["corpus"]],
        out,
        cfg,
        cache_dir=tmp_path / "cache",
        on_log=on_log,
        durable_uri=uri,
    )


def test_store_down_during_uploads_training_goes_on_then_resume_takes_the_last_whole_one(
    tmp_path: Path, store: Settings, tiny_base: Path, vocab_run: Path, small_corpus
) -> None:
    fx = {"base": tiny_base, "tokenizer": vocab_run / "tokenizer", "corpus": small_corpus["train"]}
    uri = durable.resolve_uri(f"s3://{store.checkpoint_bucket}/test", "run-1", "pretrain")
    down_at: list[int] = []
    restarted = threading.Event()

    def outage(entry: dict) -> None:
        if entry.get("step") == 3 and not down_at:
            svc.stop("seaweedfs", store)  # checkpoint-3 is uploaded into a store that is gone
            down_at.append(3)

            def back() -> None:
                time.sleep(3)
                svc.start_seaweedfs(store)
                restarted.set()

            threading.Thread(target=back, daemon=True).start()
        elif down_at and not restarted.is_set() and "loss" in entry:
            down_at.append(entry["step"])  # steps trained while the store was down

    metrics = _pretrain(tmp_path, fx, tmp_path / "run", uri, on_log=outage)
    assert metrics["steps"] == 8
    assert len(down_at) >= 3, f"training waited for the store: steps while it was down {down_at}"
    assert metrics["checkpoint_upload_failures"] >= 1 and metrics["checkpoint_uploads"] >= 1

    checkpoints = durable.CheckpointStore(uri)
    assert checkpoints.latest() == 8  # the last one, stored once the store was back
    complete = checkpoints.complete_steps()
    assert complete[-1] == 8 and len(complete) <= 2, complete  # retention, there too
    for step in checkpoints.steps():  # nothing half-written is left that could count
        assert checkpoints.manifest(step) is not None, f"checkpoint-{step} left incomplete"

    # a half-upload (files, no manifest) and a torn one (manifest, short file) above it are never taken
    s3 = checkpoints.s3
    s3.put_object(Bucket=checkpoints.bucket, Key=f"{checkpoints.prefix}/checkpoint-99/trainable.safetensors", Body=b"x")
    whole = checkpoints.manifest(8)
    s3.put_object(
        Bucket=checkpoints.bucket,
        Key=f"{checkpoints.prefix}/checkpoint-98/MANIFEST.json",
        Body=json.dumps(whole).encode(),
    )
    s3.put_object(Bucket=checkpoints.bucket, Key=f"{checkpoints.prefix}/checkpoint-98/state.json", Body=b"{}")
    assert checkpoints.latest() == 8
    fetched = checkpoints.download_latest(tmp_path / "fresh")
    assert fetched is not None and fetched.name == "checkpoint-8"

    # a retried step on an empty disk resumes there: nothing left to train, the same adapter
    again = _pretrain(tmp_path, fx, tmp_path / "retried", uri)
    assert again["resumed_from_step"] == 8
    a = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "retried" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_resume_from_the_store_mid_run_equals_an_uninterrupted_run(
    tmp_path: Path, store: Settings, tiny_base: Path, vocab_run: Path, small_corpus
) -> None:
    """The interrupted attempt's local folder is gone (another pod): only the store has its progress."""
    from zhllama.recipes.chinese_llama_alpaca.pretrain import run_pretrain

    fx = {"base": tiny_base, "tokenizer": vocab_run / "tokenizer", "corpus": small_corpus["train"]}
    whole = _pretrain(tmp_path, fx, tmp_path / "whole", "")
    uri = durable.resolve_uri(f"s3://{store.checkpoint_bucket}/test", "run-2", "pretrain")
    cfg = tiny_config("pretrain", max_steps=8, save_steps=1, save_total_limit=2, num_threads=1, lora_dropout=0.05)
    run_pretrain(
        fx["base"],
        fx["tokenizer"],
        [fx["corpus"]],
        tmp_path / "first-pod",
        cfg,
        cache_dir=tmp_path / "cache",
        stop_after_steps=5,
        durable_uri=uri,
    )
    started = time.perf_counter()
    resumed = _pretrain(tmp_path, fx, tmp_path / "second-pod", uri)
    assert resumed["resumed_from_step"] == 5, resumed
    assert whole["resumed_from_step"] == 0
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "second-pod" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
    print(f"resume from the store and 3 more steps: {time.perf_counter() - started:.1f} s")


def test_sft_resumes_from_the_store_and_equals_an_uninterrupted_run(
    tmp_path: Path, store: Settings, pt_merged: Path, tiny_sft_data
) -> None:
    """SFT goes through the same loop: a second pod resumes it from the store alone."""
    from zhllama.recipes.chinese_llama_alpaca.sft import run_sft

    cfg = tiny_config(
        "sft", max_steps=6, save_steps=2, save_total_limit=2, max_seq_length=96, eval_steps=0, lora_dropout=0.05
    )
    uri = durable.resolve_uri(f"s3://{store.checkpoint_bucket}/test", "run-3", "sft")

    def sft(out: str, durable_uri: str = "", stop: int | None = None) -> dict:
        return run_sft(
            pt_merged, tiny_sft_data["train"], None, tmp_path / out, cfg, stop_after_steps=stop, durable_uri=durable_uri
        )

    sft("whole")
    sft("first-pod", uri, stop=4)
    assert sft("second-pod", uri)["resumed_from_step"] == 4
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "second-pod" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
