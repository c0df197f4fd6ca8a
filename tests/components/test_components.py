"""Each component: its parameters mirror the stage's config dataclass, its image is one that
images/ builds, its body is one call into zhllama.steps."""

import dataclasses
import json
from pathlib import Path

import pytest
from kfp import dsl

from components._factory import TRACKING_PARAMETERS, component_source
from components.base import base
from components.data import data
from components.evaluate import evaluate
from components.images import IMAGES
from components.merge import merge
from components.prerequisites import prerequisites
from components.pretrain import pretrain, pretrain_gpu
from components.register import register
from components.sft import sft, sft_gpu
from components.vocab import vocab
from zhllama.config import BaseModelConfig, EvalConfig, MergeConfig, PretrainConfig, RegisterConfig, SftConfig, VocabConfig
from zhllama.settings import PROJECT_ROOT

KFP_TYPES = {int: "Integer", float: "Float", str: "String", bool: "Boolean", list: "List"}
STAGE_COMPONENTS = [
    ("vocab", vocab, VocabConfig),
    ("base", base, BaseModelConfig),
    ("pretrain", pretrain, PretrainConfig),
    ("pretrain_gpu", pretrain_gpu, PretrainConfig),
    ("sft", sft, SftConfig),
    ("sft_gpu", sft_gpu, SftConfig),
    ("merge", merge, MergeConfig),
    ("evaluate", evaluate, EvalConfig),
    ("register", register, RegisterConfig),
]
ALL = [*(c for _, c, _ in STAGE_COMPONENTS), data, prerequisites]


def _default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


@pytest.mark.parametrize(("name", "component", "config"), STAGE_COMPONENTS, ids=[c[0] for c in STAGE_COMPONENTS])
def test_parameters_mirror_the_config_dataclass(name, component, config) -> None:
    inputs = component.component_spec.inputs
    import typing

    from zhllama.config import _base_type

    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        assert field.name in inputs, f"{name}: no parameter for {config.__name__}.{field.name}"
        spec = inputs[field.name]
        tp = _base_type(hints[field.name])
        tp = list if typing.get_origin(tp) is list else tp
        assert spec.type == KFP_TYPES[tp], f"{name}.{field.name}: {spec.type} != {tp}"
        assert spec.default == _default(field), f"{name}.{field.name}: default {spec.default!r} != {_default(field)!r}"
    extra = {k for k, v in inputs.items() if v.type in KFP_TYPES.values()} - {f.name for f in dataclasses.fields(config)}
    allowed = {n for n, _, _ in TRACKING_PARAMETERS} | {"nproc_per_node", "nnodes", "base_model_subdir", "stage_name", "base_model_uri"}
    assert extra <= allowed, f"{name}: parameters that are not config fields: {extra - allowed}"


@pytest.mark.parametrize("component", ALL, ids=lambda c: c.name)
def test_every_component_runs_an_image_that_images_builds(component) -> None:
    image = component.component_spec.implementation.container.image
    assert image in IMAGES.values()
    dockerfile = next(name for name, tag in IMAGES.items() if tag == image)
    assert (PROJECT_ROOT / "images" / dockerfile).is_file()


@pytest.mark.parametrize("component", ALL, ids=lambda c: c.name)
def test_component_body_is_one_call_into_zhllama(component) -> None:
    source = component_source(component)
    body = source.split('"""')[-1]
    code = [line for line in body.splitlines() if line.strip() and not line.strip().startswith("from zhllama import steps")]
    assert 1 <= len(code) <= 5, code
    assert "steps." in body and "import kfp" not in body


def test_data_component_materialises_and_validates(tmp_path: Path, monkeypatch) -> None:
    """Called through the component's python_func, as KFP's executor calls it."""
    monkeypatch.setenv("ZHLLAMA_MLRUNS", str(tmp_path / "mlruns"))
    dataset = dsl.Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    md5 = data.python_func(dataset=dataset, metrics=metrics, data_revision="", data_repo="", data_md5="",
                           mlflow_tracking_uri="", mlflow_experiment="zhllama")
    assert md5.endswith(".dir") and dataset.metadata["dvc_md5"] == md5
    assert (tmp_path / "dataset" / "corpus" / "train.txt").is_file()
    assert metrics.metadata["corpus_train_lines"] > 1000
    assert json.loads((tmp_path / "metrics").read_text())["sft_test_examples"] > 0  # the file kfp.local's cache needs
    with pytest.raises(Exception, match="data_md5"):
        data.python_func(dataset=dsl.Dataset(name="d", uri=str(tmp_path / "other")), metrics=metrics, data_revision="", data_repo="",
                         data_md5="0" * 32 + ".dir", mlflow_tracking_uri="", mlflow_experiment="zhllama")
    assert not (tmp_path / "other").exists()
