"""The CI retraining workflow: tests, compile check, submit on push; retrain-if-changed nightly."""

import yaml

from zhllama.core.settings import PROJECT_ROOT


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


def test_workflow_builds_pushes_and_submits_one_commit_tag() -> None:
    """The images job pushes under the tag the submit job names, and that tag is what
    `submit --image-tag` writes into the compiled pipeline (the scheme components/images.py reads)."""
    from components.images import images_in, retag
    from pipelines.submit import COMPILED

    workflow = yaml.safe_load((PROJECT_ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    jobs = workflow["jobs"]
    assert jobs["submit"]["needs"] == "images" and jobs["images"]["needs"] == "test"
    for job in ("images", "submit"):
        assert jobs[job]["env"]["ZHLLAMA_IMAGE_TAG"] == "${{ github.sha }}"
        assert jobs[job]["env"]["ZHLLAMA_IMAGE_REGISTRY"] == "${{ secrets.IMAGE_REGISTRY }}"
    build = " ".join(str(s.get("run", "")) for s in jobs["images"]["steps"])
    assert "make images images-cuda PUSH=1" in build
    submit = " ".join(str(s.get("run", "")) for s in jobs["submit"]["steps"])
    assert '--image-tag "$ZHLLAMA_IMAGE_TAG"' in submit
    assert "ZHLLAMA_IMAGE_TAG" not in str(jobs["test"])  # the tests compile with the version tag, as checked in
    # the tag the workflow builds is the tag submit names: retagging the checked-in YAML gives images_for(kind, tag)
    from components.images import image_for

    for gpus, kinds in ((0, {"cpu"}), (1, {"cpu", "cuda"})):
        retagged = retag(COMPILED[gpus].read_text(), "0123abc")
        assert set(images_in(retagged)) == {image_for(kind, "0123abc") for kind in kinds}
