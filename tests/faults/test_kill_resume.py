"""Kill -9 the pretraining process mid-run, resume: the final weights equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zhllama.core.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _argv(out: Path, fx) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zhllama.cli",
        "pretrain",
        "--base_model",
        str(fx["base"]),
        "--tokenizer",
        str(fx["tokenizer"]),
        "--train",
        str(fx["corpus"]),
        "--out",
        str(out),
        "--block_size",
        "64",
        "--max_steps",
        "8",
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
        "--num_threads",
        "1",
        "--lora_dropout",
        "0.05",
    ]


def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus
) -> None:
    fx = {"base": tiny_base, "tokenizer": vocab_run / "tokenizer", "corpus": small_corpus["train"]}
    env = {
        **os.environ,
        "ZHLLAMA_MLRUNS": str(tmp_path / "mlruns"),
        "ZHLLAMA_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": "",
    }
    whole = subprocess.run(
        _argv(tmp_path / "whole", fx), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _argv(killed, fx), cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "checkpoint-3" / "state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()

    resumed = subprocess.run(
        [*_argv(killed, fx), "--resume"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
