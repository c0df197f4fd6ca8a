"""Bad input, one table: each case runs the real CLI and must end with one clear line naming the
file or field, a non-zero exit, no traceback and no output left behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zhllama.core.settings import PROJECT_ROOT

RECORD = {"instruction": "判断情感", "input": "很好", "output": "正面"}


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _vocab(files, tmp: Path, *extra: str) -> list[str]:
    return [
        "vocab",
        "--train",
        str(files),
        "--valid",
        str(files),
        "--out",
        str(tmp / "out"),
        "--vocab_size",
        "4000",
        *extra,
    ]


def _sft(train: Path, fx, tmp: Path) -> list[str]:
    return [
        "sft",
        "--model",
        str(fx["pt_merged"]),
        "--train",
        str(train),
        "--valid",
        "",
        "--out",
        str(tmp / "out"),
        "--max_steps",
        "1",
    ]


def _pretrain(fx, tmp: Path, *extra: str, base: Path | None = None) -> list[str]:
    return [
        "pretrain",
        "--base_model",
        str(base or fx["tiny_base"]),
        "--tokenizer",
        str(fx["vocab_run"] / "tokenizer"),
        "--train",
        str(fx["corpus"]),
        "--out",
        str(tmp / "out"),
        "--block_size",
        "64",
        "--max_steps",
        "2",
        *extra,
    ]


def _mismatched_model(fx, tmp: Path) -> Path:
    """The tiny base's weights (32,000 rows) with the merged tokenizer beside them."""
    model = tmp / "mismatch"
    shutil.copytree(fx["tiny_base"], model)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(fx["vocab_run"] / "tokenizer" / name, model / name)
    return model


def _weightless(fx, tmp: Path) -> Path:
    model = tmp / "noweights"
    shutil.copytree(fx["tiny_base"], model, ignore=shutil.ignore_patterns("*.safetensors"))
    return model


def _corrupt_checkpoint(tmp: Path) -> None:
    ckpt = tmp / "out" / "checkpoints" / "checkpoint-1"
    _write(ckpt / "state.json", json.dumps({"step": 1, "total_steps": 2, "log_history": []}))
    _write(ckpt / "trainable.safetensors", b"not a safetensors file")


# id, build argv (fixtures, tmp) -> list, words the error must contain, what must not exist afterwards
CASES = [
    ("empty corpus", lambda fx, t: _vocab(_write(t / "empty.txt", "\n\n"), t), ["empty.txt", "empty"], ["out"]),
    (
        "non-UTF-8 corpus",
        lambda fx, t: _vocab(_write(t / "latin.txt", "好\n".encode() + "café\n".encode("latin-1")), t),
        ["latin.txt:2", "not UTF-8"],
        ["out"],
    ),
    (
        "single huge line",
        lambda fx, t: _vocab(_write(t / "huge.txt", "中文" * 20000 + "\n"), t),
        ["huge.txt", "max_sentence_length"],
        ["out"],
    ),
    (
        "malformed JSON",
        lambda fx, t: _sft(_write(t / "bad.json", '[{"instruction": "a", "output": }]'), fx, t),
        ["bad.json:1", "malformed JSON"],
        ["out"],
    ),
    (
        "malformed JSONL line",
        lambda fx, t: _sft(_write(t / "bad.jsonl", json.dumps(RECORD) + "\n{oops\n"), fx, t),
        ["bad.jsonl:2", "malformed JSON line"],
        ["out"],
    ),
    (
        "missing field",
        lambda fx, t: _sft(_write(t / "nofield.json", json.dumps([{"instruction": "a"}])), fx, t),
        ["nofield.json", "'output'"],
        ["out"],
    ),
    (
        "non-string field",
        lambda fx, t: _sft(_write(t / "num.json", json.dumps([{**RECORD, "output": 1}])), fx, t),
        ["num.json", "'output' must be a string"],
        ["out"],
    ),
    (
        "instruction file of the wrong shape",
        lambda fx, t: _sft(_write(t / "shape.json", json.dumps({"data": [RECORD]})), fx, t),
        ["shape.json", "expected a JSON list of records or JSONL"],
        ["out"],
    ),
    (
        "tokenizer does not fit the model",
        lambda fx, t: ["generate", "--model", str(_mismatched_model(fx, t)), "--instruction", "你好"],
        ["mismatch", "tokenizer has", "rows"],
        [],
    ),
    (
        "base model without weights",
        lambda fx, t: _pretrain(fx, t, base=_weightless(fx, t)),
        ["noweights", "no weights"],
        ["out/adapter"],
    ),
    (
        "corrupted checkpoint",
        lambda fx, t: (_corrupt_checkpoint(t), _pretrain(fx, t, "--resume", "--save_steps", "1"))[1],
        ["checkpoint-1", "corrupted"],
        ["out/adapter", "out/metrics.json"],
    ),
    (
        "negative learning rate",
        lambda fx, t: _pretrain(fx, t, "--learning_rate", "-1"),
        ["learning_rate", "> 0"],
        ["out"],
    ),
    (
        "zero batch size",
        lambda fx, t: _pretrain(fx, t, "--per_device_train_batch_size", "0"),
        ["per_device_train_batch_size", "> 0"],
        ["out"],
    ),
    (
        "pipeline parameter of the wrong type",
        lambda fx, t: ["submit", "--host", "http://kubeflow.invalid", "--param", "pt_max_steps=many", "--dry-run"],
        ["pt_max_steps", "not a int"],
        [],
    ),
]


@pytest.fixture(scope="module")
def fx(tiny_base, vocab_run, pt_merged, small_corpus) -> dict[str, Path]:
    return {"tiny_base": tiny_base, "vocab_run": vocab_run, "pt_merged": pt_merged, "corpus": small_corpus["train"]}


@pytest.mark.parametrize(("case", "argv", "words", "absent"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, argv, words, absent, fx, tmp_path: Path, monkeypatch) -> None:
    env = {
        "ZHLLAMA_MLRUNS": str(tmp_path / "mlruns"),
        "ZHLLAMA_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": "",
    }
    command = argv(fx, tmp_path)
    import os

    done = subprocess.run(
        [sys.executable, "-m", "zhllama.cli", *command],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 2, f"{case}: exit {done.returncode}\n{done.stderr[-2000:]}"
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for word in words:
        assert word in errors[0], f"{case}: {word!r} not in {errors[0]!r}"
    for name in absent:
        assert not (tmp_path / name).exists(), f"{case}: {name} was left behind"
    assert not list(tmp_path.glob("**/.*.tmp-*")), f"{case}: temp output left behind"
