"""The container path, for real: the image `make images` built, run by the engine the project
starts, as the image's non-root user; the checked-in compiled YAML run step by step in
containers through kfp.local's DockerRunner against the real MLflow server and object store.

Needs a Docker engine or Debian's docker.io (`make setup-containers`): the fixture starts the
project's own engine when none answers and builds the image when this code's tag is missing.
Without either these tests skip, except under CI, where they fail."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.containers.conftest import docker as _docker
from tests.pipelines.test_local_run import STEPS, TINY

pytestmark = [pytest.mark.containers, pytest.mark.services, pytest.mark.slow]


def test_image_runs_as_a_non_root_user_with_writable_caches_fonts_and_bytecode(engine) -> None:
    script = """
import json, os, pathlib, tempfile
from matplotlib import font_manager
import zhllama.recipes.chinese_llama_alpaca.launchers, transformers, mlflow
out = {"uid": os.getuid(), "home": os.environ["HOME"]}
for var in ("HOME", "HF_HOME", "MPLCONFIGDIR", "ZHLLAMA_CACHE_DIR"):
    path = pathlib.Path(os.environ[var]); path.mkdir(parents=True, exist_ok=True)
    (path / "probe").write_text("ok"); out[var] = "writable"
out["tmp"] = tempfile.mkdtemp()
out["cjk_fonts"] = sorted({f.name for f in font_manager.fontManager.ttflist if "WenQuanYi" in f.name or "CJK" in f.name})
import warnings
from zhllama.recipes.chinese_llama_alpaca.report import _figure
plt = _figure()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fig = plt.figure(); fig.text(0.1, 0.5, "正面 负面 请用一句话介绍北京"); fig.savefig(tempfile.mktemp(suffix=".png"))
out["glyph_warnings"] = [str(w.message) for w in caught if "Glyph" in str(w.message)]
site = pathlib.Path(transformers.__file__).parent
out["pyc"] = len(list(site.rglob("*.pyc"))); out["py"] = len(list(site.rglob("*.py")))
print(json.dumps(out))
"""
    done = _docker(engine, "run", "--rm", "--network", "host", engine["image"], "python", "-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == 1000 and out["home"] == "/home/zhllama"
    assert all(out[v] == "writable" for v in ("HOME", "HF_HOME", "MPLCONFIGDIR", "ZHLLAMA_CACHE_DIR"))
    assert out["cjk_fonts"], "no CJK font: the report's Chinese labels would render as boxes"
    assert not out["glyph_warnings"], out["glyph_warnings"]
    assert out["pyc"] >= out["py"] * 0.9, f"bytecode not compiled at build time ({out['pyc']} .pyc for {out['py']} .py)"
    # a cluster may assign an arbitrary uid (group 0): the caches stay writable
    other = _docker(
        engine,
        "run",
        "--rm",
        "--user",
        "123456:0",
        engine["image"],
        "python",
        "-c",
        "import os, pathlib; p = pathlib.Path(os.environ['HF_HOME']); p.mkdir(parents=True, exist_ok=True); (p / 'x').write_text('ok')",
    )
    assert other.returncode == 0, other.stderr[-1000:]


def test_host_ca_bundle_is_not_in_the_image(engine) -> None:
    from zhllama.core.containers import ca_bundle

    bundle = ca_bundle()
    if bundle is None:
        pytest.skip("this host's pip names no CA bundle")
    digest = hashlib.sha256(Path(bundle).read_bytes()).hexdigest()
    size = Path(bundle).stat().st_size
    done = _docker(
        engine,
        "run",
        "--rm",
        "-u",
        "0",
        engine["image"],
        "sh",
        "-c",
        f"find / -xdev -type f -size {size}c -exec sha256sum {{}} + 2>/dev/null; ls /run/secrets 2>/dev/null; true",
    )
    assert digest not in done.stdout, f"the host CA bundle {bundle} was baked into the image"
    assert "ca" not in done.stdout.split()


class _KillAfterCheckpoint(threading.Thread):
    """Watches the object store for the first durable checkpoint of a pretrain task, then kills
    that task's container (docker kill: SIGKILL, as a preempted node gives no warning)."""

    def __init__(self, engine: dict, bucket: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.engine, self.bucket, self.prefix = engine, bucket, prefix
        self.killed: dict[str, object] = {}
        self.stop = threading.Event()

    def _container_of(self, task: str) -> str | None:
        ids = _docker(self.engine, "ps", "-q").stdout.split()
        for cid in ids:
            cmd = " ".join(json.loads(_docker(self.engine, "inspect", "--format", "{{json .Config.Cmd}}", cid).stdout))
            if re.search(rf'checkpoint_task\\?"\s*:\s*\\?"{re.escape(task)}\\?"', cmd):
                return cid
        return None

    def run(self) -> None:
        from zhllama.core.training import durable

        s3 = durable.client()
        pattern = re.compile(rf"^{re.escape(self.prefix)}/[^/]+/(pretrain[^/]*)/checkpoint-(\d+)/MANIFEST\.json$")
        while not self.stop.is_set() and not self.killed:
            try:
                listed = s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/").get("Contents", [])
            except Exception:  # SeaweedFS may answer InternalError for a prefix nobody has written yet
                listed = []
            for obj in listed:
                if match := pattern.match(obj["Key"]):
                    cid = self._container_of(match[1])
                    if cid and _docker(self.engine, "kill", cid).returncode == 0:
                        self.killed = {"task": match[1], "step": int(match[2])}
                        return
            time.sleep(0.1)


def test_compiled_yaml_is_current_and_runs_in_containers_then_is_all_cache(
    engine, services, local_runs, tmp_path_factory, monkeypatch
) -> None:
    """The YAML on disk equals a fresh compile; run it (not the Python DAG) with every step in a
    container, killing a pretrain container after its first durable checkpoint: KFP's retry
    resumes it from the object store, and the run still scores what the subprocess run of the
    Python DAG scores (its adapter equal within 1e-6), registers a champion; a second run is all cache."""
    from pipelines.local import run_local
    from pipelines.submit import COMPILED, compile_pipeline
    from zhllama.core import registry, tracking

    fresh = compile_pipeline(tmp_path_factory.mktemp("compile") / "fresh.yaml")
    assert list(yaml.safe_load_all(fresh.read_text())) == list(yaml.safe_load_all(COMPILED[0].read_text())), (
        "stale: make compile"
    )

    root = tmp_path_factory.mktemp("kfpc")
    name = f"containers-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    runs = []
    store_prefix = f"kill-{name}"
    arguments = {
        **TINY,
        "register_model_name": name,
        "checkpoint_uri": f"s3://{services.checkpoint_bucket}/{store_prefix}",
    }
    killer = _KillAfterCheckpoint(engine, services.checkpoint_bucket, store_prefix)
    killer.start()
    for attempt in ("first", "second"):
        monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", f"{attempt}-{name}")
        runs.append(
            run_local(None, arguments, pipeline_root=root / "outputs", cache_root=root / "cache", containers=True)
        )
        killer.stop.set()
    first, second = runs
    # the killed step was retried and resumed from its durable checkpoint, ending where an uninterrupted run ends
    assert killer.killed, "no pretrain container was killed: the watcher never saw a checkpoint"
    task = killer.killed["task"]
    ours_dir, theirs_dir = (Path(r["report"]).parents[1] / task for r in (first, local_runs[1][0]))
    assert json.loads((ours_dir / "metrics").read_text())["resumed_from_step"] >= killer.killed["step"]
    assert json.loads((theirs_dir / "metrics").read_text())["resumed_from_step"] == 0
    a = load_file(str(ours_dir / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(theirs_dir / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), task
    ran = {s.rsplit("-", 1)[0] if s[-1].isdigit() else s for s in first["step_seconds"]}
    assert ran >= STEPS, f"steps that did not run: {STEPS - ran}"
    assert first["registered"]["champion"] == first["registered"]["latest_version"] == "1"
    client = tracking.client()
    champion = registry.champion_version(client, name)
    assert champion.tags["zhllama.pipeline_run_id"] == first["pipeline_run_id"]
    # the steps ran in containers, as the image's user: their outputs on the bind-mounted root are its files
    report = Path(first["report"])
    assert report.stat().st_uid == (1000 if os.geteuid() == 0 else os.getuid())
    # the same figures as the Python DAG's subprocess run at the same arguments (deterministic runs)
    _, (subprocess_run, _) = local_runs
    ours, theirs = first["evaluation"], subprocess_run["evaluation"]
    scores = {k for k in theirs if "seconds" not in k and not k.endswith("_s")}
    assert scores and scores <= set(ours)
    assert {k: ours[k] for k in scores} == pytest.approx({k: theirs[k] for k in scores}, rel=1e-5, abs=1e-6)
    assert set(second["step_seconds"]) == {"prerequisites"}, second["step_seconds"]
    assert second["registered"]["latest_version"] == "1"
    # other code is another image tag, so a new cache key: every step runs again (here the same
    # image under the tag another code hash would give, so the figures stay comparable)
    import zhllama.core.containers

    moved = zhllama.core.containers.local_tag(engine["image"], "0" * 12)
    assert _docker(engine, "tag", engine["image"], moved).returncode == 0
    monkeypatch.setattr(zhllama.core.containers, "code_version", lambda root=None, kind="cpu": "0" * 12)
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", f"third-{name}")
    try:
        third = run_local(
            None,
            arguments,
            pipeline_root=root / "outputs",
            cache_root=root / "cache",
            containers=True,
        )
    finally:
        _docker(engine, "image", "rm", moved)
    assert not third["cached_steps"], third["cached_steps"]
    assert {s.rsplit("-", 1)[0] if s[-1].isdigit() else s for s in third["step_seconds"]} >= STEPS


def test_a_rejected_parameter_fails_the_run_with_its_error_and_is_never_cached(
    engine, services, tmp_path_factory, monkeypatch
) -> None:
    from pipelines.local import StepFailed, run_local

    root = tmp_path_factory.mktemp("kfpfail")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    monkeypatch.setenv("ZHLLAMA_PIPELINE_RUN_ID", f"fail-{uuid.uuid4().hex[:6]}")
    wrong = {
        **TINY,
        "data_md5": "0" * 32 + ".dir",
    }  # well-formed, but not the data's: the data step rejects it after its work
    for _ in range(2):  # the second run must run the step again, not take its partial output from the cache
        with pytest.raises(StepFailed, match=r"step data failed: .*data_md5=0{32}\.dir"):
            run_local(None, wrong, pipeline_root=root / "outputs", cache_root=root / "cache", containers=True)
    cached = [json.loads(p.read_text()) for p in (root / "cache").glob("*.json")]
    assert not any("dataset" in entry for entry in cached), "the failed data step left a cache entry"
