"""The CI retraining workflow: tests, compile check, submit on push; retrain-if-changed nightly."""

import yaml

from zhllama.settings import PROJECT_ROOT


def test_workflow_runs_tests_compiles_and_submits() -> None:
    workflow = yaml.safe_load((PROJECT_ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    triggers = workflow[True]  # YAML reads the key `on` as True
    assert "data.dvc" in triggers["push"]["paths"] and "zhllama/**" in triggers["push"]["paths"]
    steps = {job: " ".join(str(s.get("run", "")) for s in spec["steps"]) for job, spec in workflow["jobs"].items()}
    assert "make test" in steps["test"] and "make compile && git diff --exit-code pipelines/" in steps["test"]
    assert "zhllama.cli submit" in steps["submit"] and "secrets.KFP_HOST" in steps["submit"]
    assert "retrain-if-changed" in steps["retrain-if-changed"]
    text = (PROJECT_ROOT / ".github" / "workflows" / "retrain.yml").read_text()
    assert "KF_PIPELINES_TOKEN: ${{ secrets.KF_PIPELINES_TOKEN }}" in text  # credentials only from CI secrets
