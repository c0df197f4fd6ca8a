"""The cluster's paths through the real object store: a base model from ``s3://`` (fsspec), and the
data step at a git revision (DVC's filesystem reads data/ from the remote that revision names)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from zhllama.core.dvc_data import dvc_dir_md5, materialize_data
from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.corpus import validate_data
from zhllama.recipes.chinese_llama_alpaca.modeling import fetch_model

pytestmark = pytest.mark.services
DVC = str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def s3_env(services, monkeypatch) -> dict[str, str]:
    for key, value in services.s3_env().items():
        monkeypatch.setenv(key, value)
    return services.s3_env()


def test_base_model_from_s3(services, s3_env, tiny_base: Path, tmp_path: Path) -> None:
    from zhllama.core.services import s3_client

    prefix = f"models/base-{uuid.uuid4().hex[:8]}"
    client = s3_client(services)
    for path in tiny_base.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), services.mlflow_bucket, f"{prefix}/{path.relative_to(tiny_base).as_posix()}")
    info = fetch_model(f"s3://{services.mlflow_bucket}/{prefix}", tmp_path / "base")
    assert info["source"].startswith("s3://")
    fetched = {
        p.relative_to(tmp_path / "base").as_posix(): p.read_bytes()
        for p in (tmp_path / "base").rglob("*")
        if p.is_file()
    }
    original = {p.relative_to(tiny_base).as_posix(): p.read_bytes() for p in tiny_base.rglob("*") if p.is_file()}
    assert fetched == original
    with pytest.raises(InputError, match="no folder there"):
        fetch_model(f"s3://{services.mlflow_bucket}/models/absent-{uuid.uuid4().hex[:6]}", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_data_at_a_git_revision_comes_from_the_dvc_remote(services, s3_env, default_data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, **s3_env}
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "config", "core.analytics", "false"]):
        _run(cmd, repo)
    shutil.copytree(default_data, repo / "data")
    _run([DVC, "add", "-q", "data"], repo)
    _run([DVC, "remote", "add", "-d", "store", f"s3://{services.dvc_bucket}/rev-{uuid.uuid4().hex[:8]}"], repo)
    _run([DVC, "remote", "modify", "store", "endpointurl", services.s3_endpoint], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"], repo)
    revision = _run(["git", "rev-parse", "HEAD"], repo).strip()
    _run([DVC, "push", "-q"], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")  # the pod has no cache: everything comes from the remote
    out = tmp_path / "materialised"
    report = materialize_data(out, revision=revision, repo=str(repo), validate=validate_data)
    assert report["md5"] == dvc_dir_md5(default_data) and report["revision"] == revision
    assert report["corpus"]["train"]["lines"] > 1000 and (out / "sft" / "train.json").is_file()
    with pytest.raises(InputError, match="no-such-rev"):
        materialize_data(tmp_path / "bad", revision="no-such-rev", repo=str(repo))
    assert not (tmp_path / "bad").exists()
