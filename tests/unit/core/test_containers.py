"""Image naming and tags (no engine needed): the code tag follows exactly what the image holds,
and retagging a compiled pipeline renames every zhllama image and nothing else; stopping the
project's engine leaves nothing mounted under its exec-root."""

import os
from pathlib import Path

import pytest

from components.images import image_for, images_in, retag
from pipelines.submit import COMPILED
from zhllama import __version__
from zhllama.core.containers import IMAGE_INPUTS, code_version, image_in_registry, local_tag


def _tree(root: Path) -> Path:
    """A checkout with one file per image input (folders get a module)."""
    files = {"images/Dockerfile.cpu": "FROM x\n"}
    for name in IMAGE_INPUTS:
        files[name if "." in name else f"{name}/mod.py"] = f"{name}\n"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_code_tag_follows_what_the_image_holds_and_nothing_else(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo")
    before = code_version(root)
    (root / "README.md").write_text("docs only")  # not in the image
    (root / "zhllama" / "__pycache__").mkdir()
    (root / "zhllama" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / "runs").mkdir()
    assert code_version(root) == before
    (root / "zhllama" / "mod.py").write_text("x = 2\n")
    assert code_version(root) != before
    (root / "images" / "Dockerfile.cuda").write_text("FROM y\n")
    assert code_version(root, "cuda") != code_version(root, "cpu")
    assert local_tag("r.example/zhllama-cpu:0.1.0", "abc") == f"r.example/zhllama-cpu:{__version__}-abc"


def test_retag_renames_every_zhllama_image_of_the_compiled_pipeline() -> None:
    for gpus, kinds in ((0, {"cpu"}), (1, {"cpu", "cuda"})):
        text = COMPILED[gpus].read_text()
        assert set(images_in(text)) == {image_for(kind) for kind in kinds}
        moved = retag(text, "deadbeef")
        assert set(images_in(moved)) == {image_for(kind, "deadbeef") for kind in kinds}
        assert moved.replace(":deadbeef", f":{__version__}") == text  # nothing else changed
    with pytest.raises(ValueError, match="names no zhllama image"):
        retag("image: python:3.11\n", "x")


def test_a_registry_that_cannot_answer_is_unchecked_not_refused() -> None:
    found, why = image_in_registry("registry.invalid/zhllama/zhllama-cpu:abc", timeout=2)
    assert found is None and "registry.invalid" in why


@pytest.mark.skipif(os.geteuid() != 0, reason="a bind mount needs root")
def test_stopping_the_engine_unmounts_what_it_left_under_its_exec_root(tmp_path: Path) -> None:
    """dockerd leaves the host network namespace bound under its exec-root (netns/default):
    after stop_engine nothing may stay mounted there, or the project folder cannot be removed."""
    import subprocess

    from zhllama.core.containers import _unmount_below

    source, root = tmp_path / "source", tmp_path / "x"
    point = root / "netns" / "default"
    source.mkdir()
    point.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(point)], check=True)
    try:
        assert str(point) in Path("/proc/self/mounts").read_text()
        _unmount_below(root)
        assert str(point) not in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)
