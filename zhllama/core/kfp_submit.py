"""Compile a pipeline and submit it to a Kubeflow Pipelines endpoint: the platform's half of
``zhllama submit``. Arguments are checked against the pipeline's own parameters (name and type)
and every image the compiled YAML names is looked up in its registry before anything is sent,
so a typo or an unpushed image fails here, not on the cluster. Nothing here knows a recipe.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from zhllama.core.config import parse_bool, parse_list
from zhllama.core.io import InputError


def compile_pipeline(pipeline: Any, path: Path) -> Path:
    """Write ``pipeline`` compiled to ``path`` (the file a user uploads in the Kubeflow UI), whole."""
    from kfp import compiler

    tmp = path.with_name(f".{path.stem}.tmp.yaml")  # the compiler insists on .yaml
    compiler.Compiler().compile(pipeline, str(tmp))
    os.replace(tmp, path)
    return path


def _convert(name: str, tp: type, text: str) -> Any:
    try:
        if tp is bool:
            return parse_bool(text)
        if tp is list:
            value = json.loads(text) if text.startswith("[") else parse_list(text)
            if not isinstance(value, list):
                raise ValueError("expected a JSON list or comma-separated items")
            return value
        return tp(text)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise InputError(f"--param {name}={text!r}: not a {tp.__name__} ({err})") from None


def parse_params(pairs: Iterable[str], parameters: Iterable[tuple[str, Any, Any]]) -> dict[str, Any]:
    """``name=value`` strings as typed arguments of a pipeline whose parameters are
    ``(name, type, default)``; unknown names and bad values are errors."""
    known = {name: tp for name, tp, _ in parameters}
    args: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise InputError(f"--param {pair!r}: expected NAME=VALUE")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise InputError(
                f"--param {name}: not a pipeline parameter" + (f" (did you mean {', '.join(close)}?)" if close else "")
            )
        args[name] = _convert(name, known[name], text)
    return args


def check_images(images: list[str]) -> dict[str, str]:
    """Each image's state in its registry: ``present``, or ``unchecked: why`` when the registry
    cannot say (unreachable, private without credentials). A missing tag is an error: the run
    would fail on the cluster pulling it, or run other code under an old tag."""
    from zhllama.core.containers import image_in_registry

    states = {}
    for image in images:
        found, why = image_in_registry(image)
        if found is False:
            raise InputError(
                f"image {image} does not exist in its registry ({why}): build and push it first "
                f"(ZHLLAMA_IMAGE_TAG=<tag> make images images-cuda PUSH=1)"
            )
        states[image] = "present" if found else f"unchecked: {why}"
    return states


def submit(
    host: str,
    experiment: str,
    arguments: dict[str, Any],
    package_path: Path,
    compile_to: Callable[[Path], Path],
    run_name: str | None = None,
    dry_run: bool = False,
    image_tag: str | None = None,
) -> dict[str, Any]:
    """Compile (``compile_to(package_path)``), then create a run on ``host`` (auth from
    ``KF_PIPELINES_*`` env / kube config, as ``kfp.Client`` reads them). ``image_tag``: the steps'
    images under that tag (CI: the commit it built and pushed); every image is checked in its
    registry first where the registry can say. ``dry_run`` returns what would be sent."""
    from zhllama.core.containers import images_in, retag

    package_path.parent.mkdir(parents=True, exist_ok=True)
    compile_to(package_path)
    if image_tag:
        package_path.write_text(retag(package_path.read_text(encoding="utf-8"), image_tag), encoding="utf-8")
    images = check_images(images_in(package_path.read_text(encoding="utf-8")))
    plan = {
        "host": host,
        "experiment": experiment,
        "run_name": run_name,
        "package": str(package_path),
        "arguments": arguments,
        "images": images,
    }
    if dry_run:
        return {**plan, "submitted": False}
    import kfp

    client = kfp.Client(host=host, existing_token=os.environ.get("KF_PIPELINES_TOKEN") or None)
    run = client.create_run_from_pipeline_package(
        str(package_path), arguments=arguments, experiment_name=experiment, run_name=run_name, enable_caching=True
    )
    return {**plan, "submitted": True, "run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}
