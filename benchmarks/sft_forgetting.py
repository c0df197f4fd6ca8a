"""SFT options side by side: task accuracy and general-text forgetting against SFT steps.

Every option starts from the same PT-merged model and trains on the same data order; at every
``--every`` steps the LoRA model (which computes what the merged model would) is scored on the
held-out sentiment test split (log-likelihood accuracy) and on the held-out corpus text (bits
per character, as the evaluation stage scores it). The PT-merged model's own bits per character
is the reference: the final model must stay within 10% of it.

    python -m benchmarks.sft_forgetting --model runs/pt_merged --out runs/bench/forgetting
    python -m benchmarks.sft_forgetting --render runs/bench/forgetting/forgetting.json

Options are the default preset's SFT section with some fields changed (``--option
NAME:field=value,field=value``; the built-in list when none is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from zhllama.core.config import config_fields, parse_bool
from zhllama.core.io import write_json
from zhllama.core.settings import PROJECT_ROOT
from zhllama.recipes.chinese_llama_alpaca import modeling, sft
from zhllama.recipes.chinese_llama_alpaca.configs import SftConfig
from zhllama.recipes.chinese_llama_alpaca.corpus import read_corpus
from zhllama.recipes.chinese_llama_alpaca.evaluate import language_model_scores, text_chunks
from zhllama.recipes.chinese_llama_alpaca.pretrain import apply_lora
from zhllama.recipes.chinese_llama_alpaca.scoring import rank_options
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

log = logging.getLogger("sft_forgetting")

OPTIONS = [
    "recipe:modules_to_save_learning_rate=0",
    "lora_only:modules_to_save=",
    "mts_lr_2e-4:modules_to_save_learning_rate=2e-4",
    "mts_lr_5e-5:modules_to_save_learning_rate=5e-5",
]


def parse_option(spec: str) -> tuple[str, dict[str, str]]:
    name, _, fields = spec.partition(":")
    changes = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        changes[key.strip()] = value.strip()
    return name, changes


def sft_config(preset: Path, changes: dict[str, str], steps: int) -> SftConfig:
    """The preset's sft stage config with ``changes`` (values in YAML; lists joined by ``+``)."""
    types = {name: kind for name, kind, _ in config_fields(SftConfig)}
    convert = {list: lambda v: [x for x in v.split("+") if x], bool: parse_bool, int: int, float: float, str: str}
    parsed = {k: convert[types[k]](v) for k, v in changes.items()}
    return RECIPE.stage_config("sft", preset, {**parsed, "max_steps": steps, "save_steps": 0, "eval_steps": 0})


def run_option(name: str, cfg: SftConfig, args: argparse.Namespace, chunks: list[str], tests: list) -> dict[str, Any]:
    model, tokenizer, _ = sft.prepare_model(args.model, cfg)
    source, _ = sft.training_source(args.train, [args.corpus], tokenizer, cfg)
    model = apply_lora(model, cfg)
    options = sorted({r["output"] for r in tests})
    curve: list[dict[str, float]] = []

    def score(at_step: int) -> None:
        model.eval()
        acc = rank_options(model, tokenizer, tests, options, 16, cfg.max_seq_length)
        lm = language_model_scores(model, tokenizer, chunks, 8)
        curve.append({"step": at_step, "accuracy": acc["accuracy"], "bits_per_char": lm["bits_per_char"]})
        log.info("%s step %d: accuracy %.3f, %.3f bits/char", name, at_step, acc["accuracy"], lm["bits_per_char"])
        model.train()

    from zhllama.core.training.loop import train

    started = time.perf_counter()
    trained = 0
    for stop in range(args.every, args.steps + 1, args.every):
        # one run of args.steps steps, stopped at every scoring point and resumed from its checkpoint
        result = train(
            model,
            source,
            None,
            dataclasses.replace(cfg, save_steps=args.every, save_total_limit=1),
            args.workdir / name,
            resume=trained > 0,
            group_by_length=cfg.group_by_length,
            stop_after_steps=stop,
        )
        trained = result.steps
        score(trained)
    return {
        "name": name,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in FIELDS_SHOWN},
        "curve": curve,
        "seconds": time.perf_counter() - started,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


FIELDS_SHOWN = ("learning_rate", "modules_to_save", "modules_to_save_learning_rate", "text_mix_share", "max_steps")


def render(results: dict[str, Any]) -> str:
    ref = results["pt_merged_bits_per_char"]
    lines = [
        f"From the PT-merged model ({ref:.3f} bits/char; the limit, +10%, is {1.1 * ref:.3f}); accuracy on "
        f"{results['test_examples']} held-out test examples (majority share {results['majority_share']:.2f}), "
        f"bits/char on {results['text_lines']} held-out corpus lines.",
        "",
        "| option | changed | step | accuracy | bits/char | vs PT-merged | seconds (all steps) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["options"]:
        for point in row["curve"]:
            lines.append(
                f"| {row['name']} | {row['changes'] or '(preset)'} | {point['step']} | {point['accuracy']:.3f} | "
                f"{point['bits_per_char']:.3f} | {point['bits_per_char'] / ref - 1:+.1%} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(PROJECT_ROOT / "runs" / "pt_merged"))
    parser.add_argument("--train", default=str(PROJECT_ROOT / "data" / "sft" / "train.json"))
    parser.add_argument("--test", default=str(PROJECT_ROOT / "data" / "sft" / "test.json"))
    parser.add_argument("--text", default=str(PROJECT_ROOT / "data" / "corpus" / "test.txt"))
    parser.add_argument("--corpus", default=str(PROJECT_ROOT / "data" / "corpus" / "train.txt"), help="replayed text")
    parser.add_argument("--preset", default=str(PROJECT_ROOT / "configs" / "default.yaml"))
    parser.add_argument("--option", action="append", help="NAME:field=value,... (repeatable)")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=80)
    parser.add_argument("--test_examples", type=int, default=200)
    parser.add_argument("--text_lines", type=int, default=200)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "bench" / "forgetting"))
    parser.add_argument("--render", metavar="JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render:
        print(render(json.loads(Path(args.render).read_text(encoding="utf-8"))))
        return 0
    out = Path(args.out)
    args.workdir = out / "work"
    tests = sft.read_alpaca(args.test)[: args.test_examples]
    chunks = text_chunks(read_corpus([args.text])[: args.text_lines], 256)
    reference = modeling.load_model(args.model)
    ref_bpc = language_model_scores(reference, modeling.load_tokenizer(args.model), chunks, 8)["bits_per_char"]
    del reference
    gold = [r["output"] for r in tests]
    results: dict[str, Any] = {
        "pt_merged_bits_per_char": ref_bpc,
        "test_examples": len(tests),
        "majority_share": max(gold.count(g) for g in set(gold)) / len(gold),
        "text_lines": args.text_lines,
        "options": [],
    }
    for spec in args.option or OPTIONS:
        name, changes = parse_option(spec)
        cfg = sft_config(Path(args.preset), changes, args.steps)
        row = run_option(name, cfg, args, chunks, tests)
        row["changes"] = ", ".join(f"{k}={v}" for k, v in changes.items())
        results["options"].append(row)
        write_json(out / "forgetting.json", results)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
