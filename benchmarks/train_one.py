"""One training measurement in a fresh process (so peak RSS is this run's alone): zhllama's
stage or the recipe baseline, PT or SFT, for a given number of steps. Prints one JSON line.

    python -m benchmarks.train_one --impl zhllama --stage pt --workdir W --steps 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from zhllama.core.training.loop import Dist, evaluate_loss
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

PRESET = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
EVAL_PT_BLOCKS = 8
EVAL_SFT_EXAMPLES = 64


def peak_rss_mb() -> float:
    """This process's high-water mark (VmHWM): ru_maxrss would carry a parent's peak across exec."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 1024


def pt_eval_source(tokenizer, tokenizer_dir: Path, valid_file: Path, block_size: int, cache_dir: Path):
    from zhllama.recipes.chinese_llama_alpaca.pretrain import BlockSource, load_blocks

    blocks, _ = load_blocks([valid_file], tokenizer, tokenizer_dir, block_size, cache_dir)
    return BlockSource(blocks.select(range(min(EVAL_PT_BLOCKS, len(blocks)))))


def run_pt(impl: str, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel

    from zhllama.recipes.chinese_llama_alpaca import pretrain

    cfg = RECIPE.stage_config(
        "pretrain",
        PRESET,
        {
            "max_steps": args.steps,
            "save_steps": 0,
            "eval_steps": 0,
            "validation_split_percentage": 0.0,
            "logging_steps": 5,
            **overrides,
        },
    )
    out = Path(args.out_dir)
    started = time.perf_counter()
    if impl == "zhllama":
        metrics = pretrain.run_pretrain(
            args.base_model, args.tokenizer, [args.train], out, cfg, cache_dir=Path(args.cache_dir)
        )
        wall = time.perf_counter() - started
        rss = peak_rss_mb()
        history = json.loads((out / "train_log.json").read_text())
        tokens = round(metrics["tokens_per_second"] * metrics["train_seconds"])  # input tokens, as the baseline counts
        result = {
            "train_seconds": metrics["train_seconds"],
            "useful_tokens": tokens,
            "padded_tokens": tokens,
            "losses": [h["loss"] for h in history if "loss" in h],
            "prep_seconds": wall - metrics["train_seconds"],
            "blocks": metrics["data"]["train_blocks"],
            "data_cache": metrics["data"]["cache"],
        }
        model, _, _ = pretrain.prepare_model(args.base_model, args.tokenizer, cfg)
        model = PeftModel.from_pretrained(model, str(out / pretrain.ADAPTER_DIR))
    else:
        from benchmarks import recipe_baseline

        result = recipe_baseline.pretrain(args.base_model, args.tokenizer, [args.train], out, vars(cfg), args.steps)
        rss = peak_rss_mb()
        model = result.pop("model")
    from zhllama.recipes.chinese_llama_alpaca.modeling import load_tokenizer

    source = pt_eval_source(
        load_tokenizer(args.tokenizer), Path(args.tokenizer), Path(args.valid), cfg.block_size, Path(args.cache_dir)
    )
    return {**result, "peak_rss_mb": rss, "eval_loss": evaluate_loss(model, source, 2, Dist())["eval_loss"]}


def run_sft(impl: str, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel

    from zhllama.recipes.chinese_llama_alpaca import sft
    from zhllama.recipes.chinese_llama_alpaca.modeling import load_tokenizer
    from zhllama.recipes.chinese_llama_alpaca.vocab import add_pad_token

    cfg = RECIPE.stage_config(
        "sft",
        PRESET,
        {
            "max_steps": args.steps,
            "save_steps": 0,
            "eval_steps": 0,
            "logging_steps": 5,
            "text_mix_share": 0.0,  # the recipe replays no corpus text: the same rows for both
            **overrides,
        },
    )
    out = Path(args.out_dir)
    started = time.perf_counter()
    if impl == "zhllama":
        metrics = sft.run_sft(args.model, args.train, None, out, cfg)
        wall = time.perf_counter() - started
        rss = peak_rss_mb()
        history = json.loads((out / "train_log.json").read_text())
        useful = metrics["tokens_per_second"] * metrics["train_seconds"]
        result = {
            "train_seconds": metrics["train_seconds"],
            "useful_tokens": round(useful),
            "padded_tokens": round(useful / max(1e-9, 1 - metrics["padding_share"])),
            "losses": [h["loss"] for h in history if "loss" in h],
            "prep_seconds": wall - metrics["train_seconds"],
        }
        model, _, _ = sft.prepare_model(args.model, cfg)
        model = PeftModel.from_pretrained(model, str(out / "adapter"))
    else:
        from benchmarks import recipe_baseline

        result = recipe_baseline.sft(args.model, args.train, out, vars(cfg), args.steps)
        rss = peak_rss_mb()
        model = result.pop("model")
    tokenizer = load_tokenizer(args.model)
    add_pad_token(tokenizer)
    source = sft.build_source(args.valid, tokenizer, cfg.max_seq_length, EVAL_SFT_EXAMPLES)
    return {**result, "peak_rss_mb": rss, "eval_loss": evaluate_loss(model, source, 8, Dist())["eval_loss"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=["zhllama", "recipe"], required=True)
    parser.add_argument("--stage", choices=["pt", "sft"], required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--base_model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--model", help="SFT: the PT-merged model directory")
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a config override")
    parser.add_argument(
        "--ablate",
        choices=["full_logits"],
        default=None,
        help="full_logits: the output layer over every position at once, as the model's own forward does",
    )
    args = parser.parse_args(argv)
    if args.ablate == "full_logits":
        import zhllama.core.training.loss

        zhllama.core.training.loss.plain_output_head = lambda model: None
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    torch.manual_seed(0)
    result = (run_pt if args.stage == "pt" else run_sft)(args.impl, args, overrides)
    losses = result["losses"]
    result["final_train_loss"] = statistics.fmean(losses[-5:]) if losses else None
    result["useful_tokens_per_second"] = result["useful_tokens"] / result["train_seconds"]
    result["padding_share"] = 1 - result["useful_tokens"] / max(1, result["padded_tokens"])
    print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
