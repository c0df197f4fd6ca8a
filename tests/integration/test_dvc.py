"""DVC: the default data has the committed hash, and survives push, cache loss and pull
through the real object store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from zhllama.io import sha256_file
from zhllama.settings import PROJECT_ROOT

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
