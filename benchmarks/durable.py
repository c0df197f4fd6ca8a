"""``make bench BENCH_ARGS="--only durable"``: what preemption safety and the TrainJob launch cost.

On the default model (hidden 256, 4 layers, the merged vocabulary; LoRA plus the fully trained
embed_tokens/lm_head, as the default run trains it), against a private object store:

- **checkpoints**: PT with ``save_steps`` 2 written locally only, then the same run mirrored to
  the store: the size of one checkpoint, the mean upload time (in the background), the tokens/s
  of both runs (what the mirror costs the training);
- **resume**: a second "pod" with an empty disk fetches the newest checkpoint (its files checked
  against their sha256), and the whole start-to-resumed time of that step;
- **trainjob**: the pretrain component's step as a 2-node TrainJob through the kubeflow SDK's
  container backend on the project's Docker engine, against the same step in-pod under torchrun
  with 2 processes (the tiny model: the launch is what is measured).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("zhllama.bench")


def _pt(ws, out: Path, steps: int, durable_uri: str = "", stop_after: int | None = None) -> tuple[dict, float]:
    from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig
    from zhllama.recipes.chinese_llama_alpaca.pretrain import run_pretrain

    # The default preset's PT (LoRA r8 + full embed_tokens/lm_head, block 512, batch 4), checkpointing every 2 steps.

    cfg = PretrainConfig(
        max_steps=steps, save_steps=2, save_total_limit=2, eval_steps=0, logging_steps=1, block_size=512
    )
    started = time.perf_counter()
    metrics = run_pretrain(
        ws.base, ws.tokenizer, [ws.data / "corpus" / "train.txt"], out, cfg, cache_dir=ws.cache,
        stop_after_steps=stop_after, durable_uri=durable_uri,
    )  # fmt: skip
    return metrics, time.perf_counter() - started


def bench_durable(ws, steps: int = 6) -> dict[str, Any]:
    from zhllama.core import services
    from zhllama.core.training import durable

    work = Path(tempfile.mkdtemp(prefix="durable-", dir=ws.root))
    result: dict[str, Any] = {}
    with services.private(work / "services") as settings:
        env = {**settings.s3_env(), "MLFLOW_TRACKING_URI": settings.mlflow_uri}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            local, _ = _pt(ws, work / "local", steps)
            uri = durable.resolve_uri(f"s3://{settings.checkpoint_bucket}/bench", "bench-run", "pretrain")
            mirrored, _ = _pt(ws, work / "mirrored", steps, uri, stop_after=steps - 2)
            store = durable.CheckpointStore(uri)
            fetch_started = time.perf_counter()
            store.download_latest(work / "probe")
            fetch = time.perf_counter() - fetch_started
            resumed, resume_wall = _pt(ws, work / "second-pod", steps, uri)
            result["checkpoints"] = {
                "steps": steps,
                "checkpoint_mb": mirrored.get("checkpoint_mb"),
                "upload_seconds_mean": mirrored.get("checkpoint_upload_seconds_mean"),
                "uploads": mirrored.get("checkpoint_uploads"),
                "tokens_per_second_local": local["tokens_per_second"],
                "tokens_per_second_mirrored": mirrored["tokens_per_second"],
                "fetch_seconds": fetch,
                "resumed_from_step": resumed["resumed_from_step"],
                "resume_wall_seconds": resume_wall,
            }
            result["trainjob"] = _bench_trainjob(ws, work, settings)
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return result


def _bench_trainjob(ws, work: Path, settings) -> dict[str, Any]:
    """The pretrain step on the tiny model: 2 processes in-pod (torchrun) vs a 2-node TrainJob."""
    from kfp import dsl

    from components.images import IMAGE_CPU
    from components.pretrain import pretrain_cpu
    from components.tokenize import tokenize_cpu
    from zhllama.core import containers
    from zhllama.recipes.chinese_llama_alpaca import modeling
    from zhllama.recipes.chinese_llama_alpaca.configs import BaseModelConfig
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer

    if containers.docker_host() is None:
        return {"skipped": "no container engine (make engine)"}
    image = containers.local_tag(IMAGE_CPU)
    if not containers._image_exists(containers.docker_cli(), containers.engine_env(), image):
        containers.build_image(IMAGE_CPU, "cpu")
    tiny = work / "tiny"
    modeling.create_base_model(
        tiny,
        resolve_base_tokenizer(),
        BaseModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    )
    shard = dsl.Dataset(name="shard", uri=str(work / "shard"))
    tokenize_cpu.python_func(
        data=dsl.Dataset(name="data", uri=str(ws.data)), vocab=dsl.Model(name="vocab", uri=str(ws.vocab)), shard=shard
    )
    params = {"block_size": 64, "max_steps": 20, "per_device_train_batch_size": 2, "save_steps": 0, "eval_steps": 0,
              "logging_steps": 5, "num_threads": 1, "validation_split_percentage": 0.0}  # fmt: skip
    os.environ["ZHLLAMA_PIPELINE_RUN_ID"] = "bench-trainjob"
    timings = {}
    for name, more in {
        "in_pod_torchrun_2": {"nproc_per_node": 2, "checkpoint_uri": "none"},
        "trainjob_2_nodes": {
            "nnodes": 2,
            "train_launcher": "trainjob",
            "trainjob_image": image,
            "checkpoint_uri": f"s3://{settings.checkpoint_bucket}/bench-trainjob",
            "checkpoint_run": "bench",
            "checkpoint_task": "pretrain",
        },
    }.items():
        os.environ["ZHLLAMA_TRAINJOB_BACKEND"] = "container"
        started = time.perf_counter()
        pretrain_cpu.python_func(
            base_model=dsl.Model(name="base", uri=str(tiny)), vocab=dsl.Model(name="vocab", uri=str(ws.vocab)),
            shards=[shard], run=dsl.Model(name="run", uri=str(work / name)),
            metrics=dsl.Metrics(name="metrics", uri=str(work / f"{name}-metrics")), **params, **more,
        )  # fmt: skip
        timings[name] = time.perf_counter() - started
        timings[f"{name}_train_seconds"] = json.loads((work / name / "metrics.json").read_text())["train_seconds"]
    return timings


def render_durable(result: dict[str, Any]) -> str:
    c, t = result["checkpoints"], result["trainjob"]
    lines = [
        "## Durable checkpoints and the TrainJob launch (`--only durable`)",
        "",
        f"Default model, PT {c['steps']} steps of batch 4 x 512 tokens (the default preset's), a checkpoint every 2 steps (LoRA + full "
        "embed_tokens/lm_head with AdamW state), private SeaweedFS on loopback.",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| one checkpoint | {c['checkpoint_mb']:.1f} MB |",
        f"| its upload (background thread, mean of {c['uploads']}) | {c['upload_seconds_mean']:.2f} s |",
        f"| PT tokens/s, local checkpoints only / mirrored to the store | {c['tokens_per_second_local']:.0f} / "
        f"{c['tokens_per_second_mirrored']:.0f} |",
        f"| a fresh pod fetches the newest checkpoint (sha256 checked) | {c['fetch_seconds']:.2f} s |",
        f"| that pod's step, start to resumed at step {c['resumed_from_step']} and done | {c['resume_wall_seconds']:.1f} s |",
    ]
    if "skipped" in t:
        lines.append(f"| TrainJob | skipped: {t['skipped']} |")
    else:
        lines += [
            f"| pretrain step, in-pod torchrun 2 processes (tiny model, 20 steps) | {t['in_pod_torchrun_2']:.1f} s "
            f"(training {t['in_pod_torchrun_2_train_seconds']:.1f} s) |",
            f"| the same as a 2-node TrainJob (container backend, this machine) | {t['trainjob_2_nodes']:.1f} s "
            f"(training {t['trainjob_2_nodes_train_seconds']:.1f} s) |",
        ]
    return "\n".join(lines) + "\n"
