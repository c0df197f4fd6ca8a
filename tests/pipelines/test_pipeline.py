"""The DAG: its parameters, the compiled YAML in sync with the code, submit's argument handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.submit import COMPILED, compile_pipeline, compiled_path, parse_params
from zhllama.core.io import InputError
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE, RUN_PARAMETERS


def test_every_config_field_is_a_prefixed_pipeline_parameter_with_its_default() -> None:
    from zhllama.core.config import config_fields

    params = {name: default for name, _, default in RECIPE.pipeline_parameters()}
    for stage in RECIPE.configured():
        for name, _, default in config_fields(stage.config):
            if name in stage.dag_set:
                assert stage.prefix + name not in params
                continue
            assert params[stage.prefix + name] == default
    assert {name for name, *_ in RUN_PARAMETERS} <= set(params)
    assert (
        params["vocab_vocab_size"] == 20000 and params["pt_lora_rank"] == 8 and params["pt_lora_alpha"] == 32.0
    )  # the recipe's


def test_stage_arguments_do_not_take_run_wide_parameters_sharing_the_prefix() -> None:
    values = {name: default for name, _, default in RECIPE.pipeline_parameters()}
    assert "model_uri" not in RECIPE.stage_arguments(values, "base")
    pretrain = RECIPE.stage_arguments(values, "pretrain")
    assert "stage1" not in pretrain and "stage1_max_steps" not in pretrain and pretrain["lora_rank"] == 8


def test_the_pipeline_signature_is_the_written_one() -> None:
    import inspect

    from pipelines import signature
    from pipelines.chinese_llama_alpaca import chinese_llama_alpaca

    written = inspect.signature(signature.parameters).parameters
    assert list(chinese_llama_alpaca.component_spec.inputs) == list(written)
    by_stage = signature.parameters(pt_lora_rank=16)
    assert (
        by_stage["pretrain"]["lora_rank"] == 16
        and by_stage["all"]["pt_lora_rank"] == 16
        and by_stage["sft"]["lora_rank"] == 8
    )


def test_every_preset_maps_onto_pipeline_parameters() -> None:
    for preset in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        args = RECIPE.preset_arguments(preset)
        assert args, preset
        for stage in RECIPE.configured():  # and every section builds a valid config
            RECIPE.stage_config(stage.name, preset)


@pytest.mark.parametrize(
    ("gpus", "launcher"), [(0, "in_pod"), (1, "in_pod"), (0, "trainjob")], ids=["cpu", "gpu", "trainjob"]
)
def test_checked_in_yaml_is_in_sync_with_the_code(tmp_path: Path, gpus: int, launcher: str, monkeypatch) -> None:
    monkeypatch.delenv("ZHLLAMA_IMAGE_REGISTRY", raising=False)
    fresh = compile_pipeline(tmp_path / "fresh.yaml", gpus, launcher)
    committed = compiled_path(gpus, launcher)
    assert committed.is_file(), f"{committed} missing: run make compile"
    fresh_docs, committed_docs = (
        list(yaml.safe_load_all(fresh.read_text())),
        list(yaml.safe_load_all(committed.read_text())),
    )
    assert fresh_docs == committed_docs, f"{committed.name} is stale: run make compile"


def test_compiled_pipeline_shape() -> None:
    spec = next(yaml.safe_load_all(COMPILED[1].read_text()))
    root_inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert root_inputs["pt_lora_rank"]["defaultValue"] == 8 and root_inputs["pt_stage1"]["parameterType"] == "BOOLEAN"
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prerequisites", "data", "base", "vocab"} <= set(tasks)
    assert tasks["prerequisites"]["cachingOptions"] == {} and tasks["data"]["cachingOptions"]["enableCache"]
    text = COMPILED[1].read_text()
    assert "nvidia.com/gpu" in text and "zhllama-cuda:" in text
    assert (
        "AWS_SECRET_ACCESS_KEY" in text and "zhllama-local-only" not in text
    )  # credentials by secret name, never values
    assert "metadata.labels['pipeline/runid']" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zhllama.cli", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


def test_submit_dry_run_prints_the_plan_and_sends_nothing() -> None:
    done = _cli(
        "submit",
        "--host",
        "http://kubeflow.invalid:8888",
        "--experiment",
        "exp",
        "--param",
        "pt_lora_rank=16",
        "--param",
        "pt_stage1=true",
        "--param",
        "pt_lora_target_modules=q_proj,v_proj",
        "--dry-run",
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert plan["submitted"] is False and plan["host"] == "http://kubeflow.invalid:8888" and plan["experiment"] == "exp"
    assert plan["arguments"] == {"pt_lora_rank": 16, "pt_stage1": True, "pt_lora_target_modules": ["q_proj", "v_proj"]}
    assert Path(plan["package"]).is_file()


BAD_PARAMS = [
    ("unknown name", "pt_lora_rnk=16", "not a pipeline parameter (did you mean pt_lora_rank"),
    ("wrong type", "pt_lora_rank=sixteen", "not a int"),
    ("bad bool", "pt_stage1=maybe", "expected true or false"),
    ("no value", "pt_lora_rank", "expected NAME=VALUE"),
]


@pytest.mark.parametrize(("case", "param", "message"), BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_submit_parameters_fail_clearly(case, param, message) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_params([param])
    done = _cli("submit", "--host", "http://kubeflow.invalid", "--param", param, "--dry-run")
    assert done.returncode == 2 and message.split(" (")[0] in done.stderr and "Traceback" not in done.stderr


def test_submit_needs_a_host() -> None:
    done = _cli("submit", "--dry-run")
    assert done.returncode == 2 and "--host" in done.stderr


def test_compile_works_from_an_installed_wheel_outside_a_checkout(tmp_path: Path) -> None:
    """The pipeline layer ships in the package: no checkout on sys.path is needed to compile."""
    import shutil
    import zipfile

    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("zhllama", "components", "pipelines"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    wheel_cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path / "wheel"),
        ".",
    ]
    subprocess.run(wheel_cmd, cwd=source, check=True, capture_output=True, timeout=300)
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("zhllama-*.whl"))) as wheel:
        wheel.extractall(site)
    assert (site / "pipelines" / "chinese_llama_alpaca.yaml").is_file() and (
        site / "components" / "pretrain.py"
    ).is_file()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    code = "import pipelines; print(pipelines.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert where.stdout.startswith(str(site))
    done = subprocess.run(
        [sys.executable, "-m", "zhllama.cli", "compile", "--out", str(tmp_path / "p.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))["pipelineInfo"]["name"]
        == "zhllama-chinese-llama-alpaca"
    )


def _training_tasks(spec: dict) -> dict[str, dict]:
    """Every pretrain/sft task of the compiled DAG (inside its condition branches), by name."""
    found = {}
    for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]:
        found.update(
            {
                n: t
                for n, t in dag["tasks"].items()
                if t["componentRef"]["name"].startswith(("comp-pretrain", "comp-sft"))
            }
        )
    return found


@pytest.mark.parametrize("launcher", ["in_pod", "trainjob"])
def test_training_steps_retry_and_key_their_checkpoints_by_run_and_task(launcher: str) -> None:
    spec = next(yaml.safe_load_all(compiled_path(0, launcher).read_text()))
    tasks = _training_tasks(spec)
    assert len(tasks) >= 5, sorted(tasks)  # stage 1, stage 2 in both branches, the ablation, sft
    for name, task in tasks.items():
        assert task["retryPolicy"]["maxRetryCount"] == 3 and task["retryPolicy"]["backoffDuration"] == "10s", name
        params = task["inputs"]["parameters"]
        assert params["checkpoint_run"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}", name
        assert params["checkpoint_task"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}", name
        assert params["train_launcher"]["componentInputParameter"].endswith("train_launcher"), name
    others = [t for t in spec["root"]["dag"]["tasks"].values() if t["componentRef"]["name"].startswith("comp-merge")]
    assert all("retryPolicy" not in t for t in others)
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert root["train_launcher"]["defaultValue"] == launcher
    if launcher == "trainjob":  # light launcher pods; the GPUs and the CUDA image go to the TrainJob's nodes
        text = compiled_path(0, launcher).read_text()
        assert "zhllama-cuda:" in text and "gpu=1" in text
