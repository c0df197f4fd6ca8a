"""DVC: the default data has the committed hash, and survives push, cache loss and pull
through the real object store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from zhllama.core.io import sha256_file
from zhllama.core.settings import PROJECT_ROOT

DVC = str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _dvc_repo(root: Path, data: Path) -> Path:
    root.mkdir()
    _run(["git", "init", "-q"], root)
    _run([DVC, "init", "-q"], root)
    _run([DVC, "config", "core.analytics", "false"], root)
    shutil.copytree(data, root / "data")
    _run([DVC, "add", "-q", "data"], root)
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_default_data_matches_the_committed_pointer(tmp_path: Path, default_data: Path) -> None:
    repo = _dvc_repo(tmp_path / "repo", default_data)
    built = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((PROJECT_ROOT / "data.dvc").read_text())["outs"][0]
    assert built["md5"] == committed["md5"], "`make data` no longer reproduces data.dvc: rebuild and commit it"
    assert (built["size"], built["nfiles"]) == (committed["size"], committed["nfiles"])


@pytest.mark.services
def test_push_delete_cache_pull_restores(tmp_path: Path, default_data: Path, services) -> None:
    repo = _dvc_repo(tmp_path / "repo", default_data)
    before = _hashes(repo / "data")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    _run([DVC, "remote", "add", "-d", "store", f"s3://{services.dvc_bucket}/{prefix}"], repo)
    _run([DVC, "remote", "modify", "store", "endpointurl", services.s3_endpoint], repo)
    env = {**os.environ, **services.s3_env()}
    _run([DVC, "push"], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    _run([DVC, "pull"], repo, env)
    assert _hashes(repo / "data") == before
    _run([DVC, "status", "--cloud"], repo, env)


@pytest.mark.services
def test_fault_object_store_restarted_during_push(tmp_path: Path, default_data: Path, services) -> None:
    """SeaweedFS is stopped while `dvc push` uploads: the push fails; once the store is back the
    retry pushes the rest, `dvc status --cloud` is in sync, and a pull from scratch verifies."""
    import random

    from zhllama.core import services as svc

    data = tmp_path / "data"
    shutil.copytree(default_data, data)
    rng = random.Random(0)
    (data / "blobs").mkdir()
    for i in range(60):  # 60 MB in 60 objects: still uploading when the store goes down
        (data / "blobs" / f"{i:02d}.bin").write_bytes(rng.randbytes(2**20))
    repo = _dvc_repo(tmp_path / "repo", data)
    before = _hashes(repo / "data")
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    _run([DVC, "remote", "add", "-d", "store", f"s3://{services.dvc_bucket}/{prefix}"], repo)
    _run([DVC, "remote", "modify", "store", "endpointurl", services.s3_endpoint], repo)
    env = {**os.environ, **services.s3_env(), "AWS_MAX_ATTEMPTS": "2"}  # fail in seconds, not after minutes of retries
    s3 = svc.s3_client(services)
    push = subprocess.Popen(
        [DVC, "push", "-j", "2"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while s3.list_objects_v2(Bucket=services.dvc_bucket, Prefix=prefix).get("KeyCount", 0) < 1:
            assert push.poll() is None and time.monotonic() < deadline, "push ended before any object arrived"
            time.sleep(0.05)
        svc.stop("seaweedfs", services)
        output = push.communicate(timeout=600)[0]
    finally:
        if push.poll() is None:
            push.kill()
        svc.start_seaweedfs(services)
    assert push.returncode != 0, f"the push finished before the store went down; make the data bigger\n{output}"
    _run([DVC, "push"], repo, env)  # the retry
    assert _run([DVC, "status", "--cloud", "--json"], repo, env).strip() in {"{}", ""}  # nothing missing on the remote
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    _run([DVC, "pull"], repo, env)
    assert _hashes(repo / "data") == before
