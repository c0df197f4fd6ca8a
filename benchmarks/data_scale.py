"""``make bench BENCH_ARGS="--only data_scale"``: the PT data path against corpus size.

Corpora at 1x, 10x and 100x the default training corpus, built deterministically: copy k of
the default lines in a seeded shuffle (seed k; copy 0 as is), and for 10x and up the whole of
../shared/data/hongloumeng.txt once when it is there (other Chinese text the project has).
For each: zhllama's token shards (zhllama/core/token_shards.py) with 1 and 2 processes
(characters/s, the peak RSS of the parent and of the largest worker, bytes per token on disk),
PT start-up from the cached shards and its first steps' tokens/s (benchmarks.train_one), and the
recipe's own path on the same file (``datasets`` ``load_dataset("text")`` + ``map(tokenize,
num_proc=2)`` + ``map(group_texts)``, as run_clm_pt_with_peft.py): throughput and peak RSS.

    .venv/bin/python -m benchmarks.data_scale --child zhllama|recipe CORPUS TOKENIZER_DIR OUT [--workers N]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zhllama.core.settings import PROJECT_ROOT

log = logging.getLogger("zhllama.bench")
FACTORS = (1, 10, 100)
SHARED_NOVEL = PROJECT_ROOT.parent / "shared" / "data" / "hongloumeng.txt"


def build_corpus(default_train: Path, factor: int, out: Path) -> dict[str, Any]:
    """``factor`` copies of the default lines (copy k shuffled with seed k), plus the novel once
    from 10x up; written line by line (the 100x file is never built in memory)."""
    lines = default_train.read_text(encoding="utf-8").splitlines()
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for k in range(factor):
                copy = list(lines)
                if k:
                    random.Random(k).shuffle(copy)
                handle.write("\n".join(copy) + "\n")
            if factor >= 10 and SHARED_NOVEL.is_file():
                handle.write(SHARED_NOVEL.read_text(encoding="utf-8"))
        tmp.replace(out)
    return {"factor": factor, "bytes": out.stat().st_size, "path": str(out)}


def _peak_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": own, "worker_peak_rss_mb": workers}


def child_zhllama(corpus: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from zhllama.core.token_shards import tokenize_file

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    started = time.perf_counter()
    shard = tokenize_file(
        corpus, tokenizer_dir / "tokenizer.json", out, len(tok), tok.bos_token_id, tok.eos_token_id, workers
    )
    seconds = time.perf_counter() - started
    chars = _count_chars(corpus)
    return {
        "seconds": seconds,
        "chars": chars,
        "chars_per_second": chars / seconds,
        "tokens": shard.tokens,
        "bytes_per_token": out.stat().st_size / shard.tokens,
        **_peak_mb(),
    }


def child_recipe(corpus: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    block = 512
    started = time.perf_counter()

    def tokenize_function(examples):
        return tok(examples["text"])

    def group_texts(examples):
        concatenated = {k: [t for row in examples[k] for t in row] for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        return {k: [v[i : i + block] for i in range(0, total, block)] for k, v in concatenated.items()}

    raw = load_dataset("text", data_files=[str(corpus)], cache_dir=str(out), keep_in_memory=False)["train"]
    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    seconds = time.perf_counter() - started
    chars = _count_chars(corpus)
    disk = sum(p.stat().st_size for p in Path(out).rglob("*.arrow"))
    tokens = len(grouped) * block
    return {
        "seconds": seconds,
        "chars": chars,
        "chars_per_second": chars / seconds,
        "tokens": tokens,
        "bytes_per_token": disk / max(1, tokens),
        **_peak_mb(),
    }


def _count_chars(path: Path) -> int:
    chars = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            chars += len(line.rstrip("\n"))
    return chars


def run_child(kind: str, corpus: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "benchmarks.data_scale", "--child", kind, str(corpus), str(tokenizer_dir), str(out)]
    done = subprocess.run([*cmd, "--workers", str(workers)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {corpus} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    log.info(
        "%s x%s, %d process(es): %.0f chars/s, peak RSS %.0f MB (worker %.0f MB), %.2f bytes/token",
        kind,
        corpus.stem,
        workers,
        result["chars_per_second"],
        result["peak_rss_mb"],
        result["worker_peak_rss_mb"],
        result["bytes_per_token"],
    )
    return result


def bench_data_scale(ws, child, factors=FACTORS, steps: int = 2) -> dict[str, Any]:
    rows = []
    for factor in factors:
        corpus = build_corpus(ws.data / "corpus" / "train.txt", factor, ws.root / f"scale-corpus-x{factor}.txt")
        path = Path(corpus["path"])
        row: dict[str, Any] = {"factor": factor, "mb": corpus["bytes"] / 2**20}
        for workers in (1, 2):
            row[f"zhllama_{workers}"] = run_child("zhllama", path, ws.tokenizer, ws.root / "scale-shard.bin", workers)
        row["recipe_2"] = run_child("recipe", path, ws.tokenizer, ws.root / "scale-arrow", 2)
        # PT from the corpus: a cold run tokenizes into the cache, the warm one is the start-up
        cache = ws.root / f"cache-data-scale-x{factor}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        args = [
            "--impl",
            "zhllama",
            "--stage",
            "pt",
            "--steps",
            str(steps),
            "--cache_dir",
            str(cache),
            "--base_model",
            str(ws.base),
            "--tokenizer",
            str(ws.tokenizer),
            "--train",
            str(path),
            "--valid",
            str(ws.data / "corpus" / "valid.txt"),
        ]
        child(args, ws.root, f"data-scale-cold-x{factor}")
        warm = child(args, ws.root, f"data-scale-warm-x{factor}")
        row["pt"] = {k: warm[k] for k in ("prep_seconds", "peak_rss_mb", "useful_tokens_per_second", "blocks")}
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        rows.append(row)
    return {"rows": rows, "novel": SHARED_NOVEL.is_file()}


def render_data_scale(s: dict[str, Any], table) -> str:
    rows = []
    for r in s["rows"]:
        z1, z2, rc, pt = r["zhllama_1"], r["zhllama_2"], r["recipe_2"], r["pt"]
        rows.append(
            [
                f"x{r['factor']}",
                f"{r['mb']:.0f}",
                f"{z1['chars_per_second'] / 1e6:.2f}",
                f"{z2['chars_per_second'] / 1e6:.2f}",
                f"{rc['chars_per_second'] / 1e6:.2f}",
                f"{z2['peak_rss_mb']:.0f} / {z2['worker_peak_rss_mb']:.0f}",
                f"{rc['peak_rss_mb']:.0f} / {rc['worker_peak_rss_mb']:.0f}",
                f"{z2['bytes_per_token']:.2f}",
                f"{rc['bytes_per_token']:.2f}",
                f"{pt['prep_seconds']:.1f}",
                f"{pt['peak_rss_mb']:.0f}",
                f"{pt['useful_tokens_per_second']:.0f}",
            ]
        )
    return (
        "## PT data against corpus size (token shards vs the recipe's datasets path)\n\n"
        "Corpora: k shuffled copies of the default corpus"
        + (" plus 红楼梦 once from x10" if s["novel"] else "")
        + ". Throughput in million characters/s; RSS as parent / largest worker (MB).\n\n"
        + table(
            [
                "corpus",
                "MB",
                "shards 1 proc",
                "shards 2 procs",
                "recipe 2 procs",
                "shards RSS",
                "recipe RSS",
                "shard bytes/token",
                "Arrow bytes/token",
                "PT start-up s (cached)",
                "PT peak RSS MB",
                "PT tokens/s",
            ],
            rows,
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["zhllama", "recipe"], required=True)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    run = child_zhllama if args.child == "zhllama" else child_recipe
    print(json.dumps(run(args.corpus, args.tokenizer_dir, args.out, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
