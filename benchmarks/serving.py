"""``make bench BENCH_ARGS="--only serving"``: generation speed of the served model.

For the tiny default (the default architecture at the merged vocabulary, benchmarks/workspace.py)
and, with ``--serving_smollm2``, SmolLM2-135M as shipped (dequantized Q4_1): the model is logged as
the registered pyfunc into a private MLflow server and object store (free ports, started and
stopped here), served from the registry by ``zhllama.core.model_server`` (MLflow's scoring
server), and asked the same fixed prompts over loopback:

- 1 client: ``--serving_requests`` requests one after another;
- 4 clients: 4 threads, 4x as many requests in all (a fixed count: the load stops by itself);
- in process: ``generate()`` on the same prompts and settings, with the KV cache (as served) and
  without it (``use_cache=False``: every new token recomputes the whole prefix), so the serving
  overhead and what the cache buys are both visible.

Latency is per request (p50/p95); tokens/s counts the answer's tokens (the answer re-tokenized,
no special tokens) over the wall time of the load. Sampling uses the recipe's settings with a
fixed seed, ``max_new_tokens`` 32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("zhllama.bench")
MAX_NEW_TOKENS = 32
PROMPTS = [
    {"instruction": "请用一句话介绍北京。", "input": ""},
    {"instruction": "中国的首都是哪里？", "input": ""},
    {"instruction": "写一句关于春天的诗。", "input": ""},
    {
        "instruction": "判断下面这条评论的情感倾向，只回答“正面”或“负面”。",
        "input": "质量很好，非常满意，下次还会再买。",
    },
]


@contextlib.contextmanager
def private_services(root: Path):
    """A SeaweedFS + MLflow pair of the bench's own, with tracking pointed at it."""
    from zhllama.core import services

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    with services.private(Path(tempfile.mkdtemp(prefix="serving-services-", dir=root))) as settings:
        os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_uri
        try:
            yield settings
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved


def register_for_bench(model_dir: Path, name: str) -> str:
    """The model as the registered pyfunc (what the pipeline registers), version 1."""
    import mlflow
    from zhllama.core import tracking
    from zhllama.recipes.chinese_llama_alpaca.serving import log_pyfunc_model

    client = tracking.client()
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run(run_name=name) as run:
        run_id = run.info.run_id
    info = log_pyfunc_model(model_dir, run_id, client.tracking_uri)
    client.create_registered_model(name)
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id)
    return str(version.version)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _load_figures(latencies: list[float], tokens: int, wall: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": _percentile(latencies, 0.95),
        "generated_tokens": tokens,
        "tokens_per_second": tokens / wall,
        "wall_seconds": wall,
    }


def served_load(url: str, tokenizer, clients: int, requests: int) -> dict[str, Any]:
    from zhllama.core.model_server import invoke

    def one(i: int) -> tuple[float, int]:
        prompt = PROMPTS[i % len(PROMPTS)]
        answer = invoke(url, {"dataframe_records": [prompt], "params": {"max_new_tokens": MAX_NEW_TOKENS}}, 300)
        if answer.status != 200:
            raise RuntimeError(f"serving bench: status {answer.status}: {answer.body}")
        text = answer.body["predictions"][0]
        return answer.seconds, len(tokenizer(text, add_special_tokens=False)["input_ids"])

    invoke(url, {"dataframe_records": [PROMPTS[0]], "params": {"max_new_tokens": 2}}, 300)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return _load_figures([r[0] for r in results], sum(r[1] for r in results), wall)


def in_process(model_dir: Path, requests: int) -> dict[str, Any]:
    """``generate()`` as ``zhllama generate`` runs it, with and without the KV cache."""
    import torch

    from zhllama.recipes.chinese_llama_alpaca import modeling
    from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings, generate

    model, tokenizer = modeling.load_model(model_dir), modeling.load_tokenizer(model_dir)
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    generate(model, tokenizer, PROMPTS[0]["instruction"], "", GenerationSettings(max_new_tokens=2))  # warm-up
    figures = {}
    for label, use_cache in (("kv_cache", True), ("no_cache", False)):
        model.generation_config.use_cache = use_cache
        latencies, tokens = [], 0
        started = time.perf_counter()
        for i in range(requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            t = time.perf_counter()
            with torch.inference_mode():
                text = generate(model, tokenizer, prompt["instruction"], prompt["input"], settings)
            latencies.append(time.perf_counter() - t)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        figures[label] = _load_figures(latencies, tokens, time.perf_counter() - started)
    model.generation_config.use_cache = True
    return figures


def bench_model(model_dir: Path, label: str, requests: int) -> dict[str, Any]:
    from zhllama.core import model_server
    from zhllama.recipes.chinese_llama_alpaca import modeling

    name = f"bench-{label}"
    result: dict[str, Any] = {"in_process": in_process(model_dir, requests)}  # first: no server on the cores
    version = register_for_bench(model_dir, name)
    served = model_server.start(name, version, service=f"bench-{label}", timeout=900)
    tokenizer = modeling.load_tokenizer(model_dir)
    try:
        result["server_start_seconds"] = served.seconds_to_ready
        result["served_1_client"] = served_load(served.url, tokenizer, 1, requests)
        result["served_4_clients"] = served_load(served.url, tokenizer, 4, 4 * requests)
    finally:
        model_server.stop(service=f"bench-{label}")
    log.info(
        "serving %s: served %.1f tok/s (1 client), %.1f (4 clients); in process %.1f (KV cache), %.1f (none)",
        label,
        result["served_1_client"]["tokens_per_second"],
        result["served_4_clients"]["tokens_per_second"],
        result["in_process"]["kv_cache"]["tokens_per_second"],
        result["in_process"]["no_cache"]["tokens_per_second"],
    )
    return result


def bench_serving(ws, requests: int = 8, smollm2: bool = False) -> dict[str, Any]:
    models = {"tiny-default": ws.sft_model}
    if smollm2:
        from benchmarks.smollm2 import prepare_smollm2

        models["smollm2"] = prepare_smollm2(ws.root / "smollm2", ws.data)[0]
    with private_services(ws.root) as _settings:
        return {label: bench_model(path, label, requests) for label, path in models.items()}


def render_serving(result: dict[str, Any]) -> str:
    lines = [
        "## Serving: the registered pyfunc behind MLflow's scoring server, over loopback",
        "",
        f"{MAX_NEW_TOKENS} new tokens a request, the recipe's sampling settings. Latency per request; "
        "tokens/s = answer tokens over the load's wall time.",
        "",
        "| model | how | requests | p50 s | p95 s | tokens/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, figures in result.items():
        rows = [
            ("served, 1 client", figures["served_1_client"]),
            ("served, 4 clients", figures["served_4_clients"]),
            ("in process, KV cache", figures["in_process"]["kv_cache"]),
            ("in process, no cache", figures["in_process"]["no_cache"]),
        ]
        for how, f in rows:
            lines.append(
                f"| {label} | {how} | {f['requests']} | {f['latency_p50_s']:.3f} | {f['latency_p95_s']:.3f} | "
                f"{f['tokens_per_second']:.1f} |"
            )
        lines.append(f"| {label} | server start (download + load) | | | | {figures['server_start_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"
