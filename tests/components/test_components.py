"""Each component: written from the stage table (and current), its parameters mirror the stage's
config dataclass, it runs the image images/ builds for this version, and its body builds the
config field by field and makes one call into the recipe's launchers."""

import ast
import dataclasses
import importlib
import inspect
import json
import typing
from pathlib import Path

import pytest
from kfp import dsl

from components.data import data_cpu
from components.images import IMAGES, VERSION, image_for
from zhllama import __version__
from zhllama.core.codegen import main as codegen
from zhllama.core.config import config_fields
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca import launchers
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

KFP_TYPES = {int: "Integer", float: "Float", str: "String", bool: "Boolean", list: "List"}
VARIANTS = [(stage, kind) for stage in RECIPE.stages for kind in (("cpu", "gpu") if stage.gpu_variant else ("cpu",))]
IDS = [f"{stage.name}-{kind}" for stage, kind in VARIANTS]


def _component(stage, kind: str = "cpu"):
    return getattr(importlib.import_module(f"components.{stage.name}"), f"{stage.name}_{kind}")


def test_written_components_and_signature_are_current() -> None:
    assert codegen(["--check"]) == 0, "components/ or pipelines/signature.py is stale: run make components"


@pytest.mark.parametrize(("stage", "kind"), VARIANTS, ids=IDS)
def test_parameters_mirror_the_config_dataclass(stage, kind) -> None:
    inputs = _component(stage, kind).component_spec.inputs
    declared = {name for name, *_ in (*RECIPE.tracking_parameters, *stage.parameters)}
    if stage.config is None and not stage.inputs and not stage.outputs:  # prerequisites: every pipeline parameter
        assert set(inputs) == {name for name, _, _ in RECIPE.pipeline_parameters()}
        return
    fields = config_fields(stage.config) if stage.config else []
    for name, tp, default in fields:
        assert name in inputs, f"{stage.name}: no parameter for {stage.config.__name__}.{name}"
        kfp_type = KFP_TYPES[list if typing.get_origin(tp) is list else tp]
        assert inputs[name].type == kfp_type, f"{stage.name}.{name}: {inputs[name].type} != {kfp_type}"
        assert inputs[name].default == default, f"{stage.name}.{name}: default {inputs[name].default!r} != {default!r}"
    parameters = {k for k, v in inputs.items() if v.type in KFP_TYPES.values()}
    assert parameters == {name for name, _, _ in fields} | declared
    artifacts = set(inputs) - parameters
    assert artifacts == set(stage.inputs) | set(stage.optional_inputs), (
        f"{stage.name}: artifact inputs {artifacts} != the table's {set(stage.inputs) | set(stage.optional_inputs)}"
    )
    assert {name for name in artifacts if inputs[name].optional} == set(stage.optional_inputs)


@pytest.mark.parametrize(("stage", "kind"), VARIANTS, ids=IDS)
def test_every_component_runs_the_image_images_builds_for_this_version(stage, kind, monkeypatch) -> None:
    image = _component(stage, kind).component_spec.implementation.container.image
    image_kind = "cuda" if kind == "gpu" else "cpu"
    assert image == image_for(image_kind), f"{stage.name}: {image} is not the {image_kind} image"
    assert image.endswith(f":{VERSION}") and __version__ == VERSION  # the tag is the package version
    assert (PROJECT_ROOT / "images" / f"Dockerfile.{image_kind}").is_file() and IMAGES[
        f"Dockerfile.{image_kind}"
    ] == image


@pytest.mark.parametrize("stage", RECIPE.stages, ids=[s.name for s in RECIPE.stages])
def test_component_body_builds_the_config_and_makes_one_launcher_call(stage) -> None:
    func = _component(stage).python_func
    tree = ast.parse(inspect.getsource(func)).body[0]
    body = [node for node in tree.body if not isinstance(node, ast.Import | ast.ImportFrom)]
    body = body[1:] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body  # docstring
    if stage.config is not None:
        build, body = body[0], body[1:]
        assert isinstance(build, ast.Assign) and build.value.func.id == stage.config.__name__
        assert {(k.arg, k.value.id) for k in build.value.keywords} == {
            (name, name) for name, _, _ in config_fields(stage.config)
        }
    assert len(body) == 1, ast.dump(tree)
    call = body[0].value
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == f"launchers.{stage.name}"
    assert hasattr(launchers, stage.name), f"launchers.{stage.name} missing"
    assert "import kfp" not in inspect.getsource(func)


def test_data_component_materialises_and_validates(tmp_path: Path, monkeypatch) -> None:
    """Called through the component's python_func, as KFP's executor calls it."""
    monkeypatch.setenv("ZHLLAMA_MLRUNS", str(tmp_path / "mlruns"))
    dataset = dsl.Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    args = {"data_revision": "", "data_repo": "", "mlflow_tracking_uri": "", "mlflow_experiment": "zhllama"}
    md5 = data_cpu.python_func(dataset=dataset, metrics=metrics, data_md5="", **args)
    assert md5.endswith(".dir") and dataset.metadata["dvc_md5"] == md5
    assert (tmp_path / "dataset" / "corpus" / "train.txt").is_file()
    assert metrics.metadata["corpus_train_lines"] > 1000
    assert json.loads((tmp_path / "metrics").read_text())["sft_test_examples"] > 0  # the file kfp.local's cache needs
    with pytest.raises(Exception, match="data_md5"):
        other = dsl.Dataset(name="d", uri=str(tmp_path / "other"))
        data_cpu.python_func(dataset=other, metrics=metrics, data_md5="0" * 32 + ".dir", **args)
    assert not (tmp_path / "other").exists()


def test_a_config_field_reaches_the_component_and_the_pipeline_by_name() -> None:
    """grep-ability: the knob's name appears literally on every hop."""
    signature = (PROJECT_ROOT / "pipelines" / "signature.py").read_text(encoding="utf-8")
    component = (PROJECT_ROOT / "components" / "pretrain.py").read_text(encoding="utf-8")
    assert "    pt_lora_rank: int = 8," in signature and '"lora_rank": pt_lora_rank,' in signature
    assert "    lora_rank: int = 8," in component and "        lora_rank=lora_rank," in component
    assert dataclasses.is_dataclass(RECIPE.stage("pretrain").config)


PREREQUISITE_CASES = [
    ("rank zero", {"pt_lora_rank": 0}, r"pipeline parameters pt_\*: .*lora_rank must be > 0"),
    ("bad vocab model type", {"vocab_model_type": "word"}, r"pipeline parameters vocab_\*: .*model_type"),
    ("negative stage-1 steps", {"pt_stage1_max_steps": -1}, "pt_stage1_max_steps must be >= 0"),
    ("unknown gate metric", {"register_promotion_metrics": ["bleu:max"]}, "'bleu' is not an evaluation metric"),
    ("malformed gate metric", {"register_promotion_metrics": ["sft_test_loss:up"]}, "expected NAME:max or NAME:min"),
    ("unknown floor metric", {"register_floor_thresholds": ["bleu>=0.3"]}, "'bleu' is not an evaluation metric"),
    ("malformed floor", {"register_floor_thresholds": ["task_accuracy_loglik=0.6"]}, "NAME>=NUMBER or NAME<=NUMBER"),
]


@pytest.mark.parametrize(("case", "bad", "message"), PREREQUISITE_CASES, ids=[c[0] for c in PREREQUISITE_CASES])
def test_prerequisites_step_fails_in_seconds_naming_the_bad_parameter(case, bad, message, local_tracking) -> None:
    from components.prerequisites import prerequisites_cpu

    defaults = {name: default for name, _, default in RECIPE.pipeline_parameters()}
    with pytest.raises(Exception, match=message):
        prerequisites_cpu.python_func(**{**defaults, **bad})


def test_prerequisites_accept_every_metric_evaluation_produces(local_tracking) -> None:
    from components.prerequisites import prerequisites_cpu

    defaults = {name: default for name, _, default in RECIPE.pipeline_parameters()}
    gate = ["pt_valid_loss:min", "final_bits_per_byte:min", "task_accuracy_loglik:max"]
    assert prerequisites_cpu.python_func(**{**defaults, "register_promotion_metrics": gate}).startswith("sqlite:")
