"""A stage whose output cannot be written: one clear error naming the output, a non-zero exit
(1: the machine, not the input), no traceback, and nothing half-written left behind.

Disk full is made real with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): every write past
it fails with EFBIG, as a full disk fails with ENOSPC, in the middle of writing the model."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from zhllama.core.settings import PROJECT_ROOT


def _cli(argv: list[str], tmp_path: Path, preexec=None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ZHLLAMA_MLRUNS": str(tmp_path / "mlruns"),
        "ZHLLAMA_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "zhllama.cli", *argv],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=preexec,
    )


def _one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stderr[-2000:]}"
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return errors[0]


def test_disk_full_while_writing_the_merged_model(tmp_path: Path, tiny_base: Path, pt_run: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_base.glob("*.safetensors"))
    limit = 2 * 2**20  # room for logs and the local tracking store, not for the model
    assert size > limit

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "merged"
    error = _one_error(
        _cli(
            ["merge", "--base_model", str(tiny_base), "--adapters", str(pt_run), "--out", str(out)],
            tmp_path,
            small_disk,
        )
    )
    assert str(out) in error and "File too large" in error and "nothing was left" in error
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp-*")), "temp output left behind"
    # the same command with room to write succeeds: the failure left nothing in the way
    assert (
        _cli(
            ["merge", "--base_model", str(tiny_base), "--adapters", str(pt_run), "--out", str(out)], tmp_path
        ).returncode
        == 0
    )
    assert (out / "config.json").is_file()


def _unwritable_parent(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    # root ignores permission bits; /sys is a kernel file system where no directory can be made
    try:
        os.mkdir("/sys/zhllama-probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/zhllama-probe")
    pytest.skip("running as root with a writable /sys: no unwritable directory to test with")


def test_unwritable_output_directory(tmp_path: Path, small_corpus: dict[str, Path]) -> None:
    parent = _unwritable_parent(tmp_path)
    out = parent / "zhllama-vocab"
    error = _one_error(
        _cli(
            [
                "vocab",
                "--train",
                str(small_corpus["train"]),
                "--valid",
                str(small_corpus["valid"]),
                "--out",
                str(out),
                "--vocab_size",
                "2000",
            ],
            tmp_path,
        )
    )
    assert str(out) in error and "cannot write" in error
    assert not out.exists()
