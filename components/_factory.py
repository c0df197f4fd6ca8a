"""Components whose parameters come from a stage's config dataclass, so a knob is declared once
(zhllama/config.py) and the component, the CLI and the pipeline all follow it.

KFP builds a lightweight component from a function's signature and its source text. The
factory writes that function's source from the dataclass (one typed parameter per field, with
the field's default), registers the text with ``linecache`` so KFP can read it like a file's,
and decorates it. The body is one call into ``zhllama.steps``.
tests/components/test_components.py checks every component against its dataclass.
"""

from __future__ import annotations

import dataclasses
import linecache
import typing
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from zhllama.config import _base_type

# Every step takes these: where tracking goes (empty: $MLFLOW_TRACKING_URI from the cluster's secret
# or env). The pipeline run id is NOT a parameter: it changes every run and would defeat caching;
# it reaches the step as $ZHLLAMA_PIPELINE_RUN_ID (downward API on a cluster, `make run` locally).
TRACKING_PARAMETERS: list[tuple[str, type, Any]] = [
    ("mlflow_tracking_uri", str, ""),
    ("mlflow_experiment", str, "zhllama"),
]
_NAMESPACE = {"Input": Input, "Output": Output, "Model": Model, "Dataset": Dataset, "Metrics": Metrics, "HTML": HTML,
              "Artifact": Artifact, "NamedTuple": NamedTuple}


def config_parameters(cls: type, exclude: tuple[str, ...] = ()) -> list[tuple[str, type, Any]]:
    """(name, type, default) per dataclass field; ``list[str]`` becomes KFP's ``list``."""
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        tp = _base_type(hints[field.name])
        tp = list if typing.get_origin(tp) is list else tp
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        params.append((field.name, tp, default))
    return params


def make_component(name: str, doc: str, image: str, artifacts: dict[str, str], parameters: list[tuple[str, type, Any]],
                   call: str, returns: str = "None"):
    """``artifacts``: argument name -> annotation text (``Input[Model]``); ``call``: the body."""
    lines = [f"def {name}("]
    lines += [f"    {arg}: {annotation}," for arg, annotation in artifacts.items()]
    lines += [f"    {param}: {tp.__name__} = {default!r}," for param, tp, default in parameters]
    lines += [f") -> {returns}:", f'    """{doc}"""', "    from zhllama import steps", "", *(f"    {line}" for line in call.strip().splitlines())]
    source = "\n".join(lines) + "\n"
    filename = f"<zhllama component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = dict(_NAMESPACE)
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own generated source, see module docstring
    func = namespace[name]
    func.__module__ = __name__
    return dsl.component(base_image=image, install_kfp_package=False)(func)


def component_source(component) -> str:
    """The generated source, for reading: ``python -m components pretrain``."""
    return component.component_spec.implementation.container.command[-1]


def stage_parameters(cls: type | None = None, exclude: tuple[str, ...] = (), extra: list[tuple[str, type, Any]] | None = None):
    """Tracking parameters, then any extra ones, then the config dataclass's fields."""
    return [*TRACKING_PARAMETERS, *(extra or []), *(config_parameters(cls, exclude) if cls else [])]
