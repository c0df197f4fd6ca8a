"""Per-step start-up: seconds from a step's process start to the moment its own work can begin
(the imports the step needs: kfp's executor, zhllama's step module and the stage's libraries),
with and without a bytecode cache, on the host venv and in the step image (container start
included). ``without bytecode`` is emulated exactly: ``PYTHONPYCACHEPREFIX`` points at an empty
folder and nothing is written, so every module compiles from source, as it did before the
bytecode was compiled at install time.

``--pretrain RUN_DIR`` also times ``zhllama pretrain`` (default preset, one step) from process
start to the end of its first optimizer step, on the base, vocabulary and data of a finished
``make run`` (``.kfp_outputs/<run>``), host and container, with and without bytecode; the block
cache is warm in both, so the figure is start-up plus one step.

    python -m benchmarks.startup [--image TAG] [--repeat 3] [--pretrain .kfp_outputs/<run>] [--out runs/bench/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What each step imports before its work starts (components/*.py -> zhllama.recipes.chinese_llama_alpaca.launchers -> the stage).
STEP_IMPORTS = {
    "data": "zhllama.core.dvc_data",
    "vocab": "zhllama.recipes.chinese_llama_alpaca.vocab, zhllama.recipes.chinese_llama_alpaca.runs",
    "pretrain": "zhllama.recipes.chinese_llama_alpaca.pretrain, zhllama.recipes.chinese_llama_alpaca.runs",
    "merge": "zhllama.recipes.chinese_llama_alpaca.merge, zhllama.recipes.chinese_llama_alpaca.runs",
    "sft": "zhllama.recipes.chinese_llama_alpaca.sft, zhllama.recipes.chinese_llama_alpaca.runs",
    "evaluate": "zhllama.recipes.chinese_llama_alpaca.evaluate, zhllama.recipes.chinese_llama_alpaca.runs",
    "register": "zhllama.core.registry, zhllama.recipes.chinese_llama_alpaca.runs",
}


def _snippet(modules: str) -> str:
    return f"import kfp.dsl.executor_main, zhllama.recipes.chinese_llama_alpaca.launchers, zhllama.core.tracking, {modules}"


def _time(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(image: str | None, repeat: int) -> dict[str, dict[str, float]]:
    from zhllama.core import containers

    results: dict[str, dict[str, float]] = {}
    empty = tempfile.mkdtemp(prefix="zhllama-nopyc-")
    host_env = {**os.environ}
    for step, modules in STEP_IMPORTS.items():
        row: dict[str, float] = {}
        variants = {
            "host, bytecode": ([sys.executable, "-c", _snippet(modules)], host_env),
            "host, no bytecode": (
                [sys.executable, "-c", _snippet(modules)],
                {**host_env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"},
            ),
        }
        if image:
            cli, env = containers.docker_cli(), containers.engine_env()
            base = [cli, "run", "--rm", "--network", "host"]
            variants["container, bytecode"] = ([*base, image, "python", "-c", _snippet(modules)], env)
            variants["container, no bytecode"] = (
                [
                    *base,
                    "-e",
                    "PYTHONPYCACHEPREFIX=/tmp/nopyc",
                    "-e",
                    "PYTHONDONTWRITEBYTECODE=1",
                    image,
                    "python",
                    "-c",
                    _snippet(modules),
                ],
                env,
            )
            variants["container start alone"] = ([*base, image, "true"], env)
        for name, (cmd, env) in variants.items():
            row[name] = round(statistics.median(_time(cmd, env) for _ in range(repeat)), 2)
        results[step] = row
        print(step, json.dumps(row), flush=True)
    return results


def measure_pretrain(run_dir: Path, image: str | None, repeat: int) -> dict[str, float]:
    """Seconds to the first optimizer step of ``zhllama pretrain`` (exits after it)."""
    from zhllama.core import containers

    run_dir = run_dir.resolve()
    base, tokenizer, train = (
        run_dir / "base" / "model",
        run_dir / "vocab" / "tokenizer" / "tokenizer",
        run_dir / "data" / "dataset" / "corpus" / "train.txt",
    )
    out = Path(tempfile.mkdtemp(prefix="zhllama-startup-"))
    os.chmod(out, 0o777)
    preset = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    flags = ["--max_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--logging_steps", "1"]
    empty = tempfile.mkdtemp(prefix="zhllama-nopyc-")
    host = [
        sys.executable,
        "-m",
        "zhllama.cli",
        "pretrain",
        "--preset",
        str(preset),
        "--base_model",
        str(base),
        "--tokenizer",
        str(tokenizer),
        "--train",
        str(train),
        *flags,
    ]
    env = {
        **os.environ,
        "ZHLLAMA_CACHE_DIR": str(out / "cache"),
        "MLFLOW_TRACKING_URI": "",
        "ZHLLAMA_MLRUNS": str(out / "mlruns"),
    }
    variants = {
        "host, bytecode": (host, env),
        "host, no bytecode": (host, {**env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}),
    }
    if image:
        cli, engine = containers.docker_cli(), containers.engine_env()
        inside = [
            "python",
            "-m",
            "zhllama.cli",
            "pretrain",
            "--preset",
            "/opt/zhllama/configs/default.yaml",
            "--base_model",
            str(base),
            "--tokenizer",
            str(tokenizer),
            "--train",
            str(train),
            *flags,
        ]
        run = [
            cli,
            "run",
            "--rm",
            "--network",
            "host",
            "-v",
            f"{run_dir}:{run_dir}:ro",
            "-v",
            f"{out}:{out}",
            "-e",
            f"ZHLLAMA_CACHE_DIR={out}/ccache",
            "-e",
            f"ZHLLAMA_MLRUNS={out}/cmlruns",
        ]
        variants["container, bytecode"] = ([*run, image, *inside], engine)
        variants["container, no bytecode"] = (
            [*run, "-e", "PYTHONPYCACHEPREFIX=/tmp/nopyc", "-e", "PYTHONDONTWRITEBYTECODE=1", image, *inside],
            engine,
        )
    row = {}
    for name, (cmd, run_env) in variants.items():
        times = []
        for i in range(repeat + 1):  # the first fills the block cache
            target = out / f"{name.replace(', ', '-').replace(' ', '-')}-{i}"
            seconds = _time([*cmd, "--out", str(target)], run_env)
            if i:
                times.append(seconds)
        row[name] = round(statistics.median(times), 1)
        print("pretrain to first step", name, row[name], flush=True)
    return row


def table(results: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| step | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {step} | " + " | ".join(f"{row[c]:.1f} s" for c in columns) + " |" for step, row in results.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--image", default=None, help="also measure in this image (default: this code's local tag, when built)"
    )
    parser.add_argument("--no-image", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-imports", action="store_true", help="only the --pretrain measurement")
    parser.add_argument("--pretrain", default=None, help="a finished make run's pipeline-run folder under .kfp_outputs")
    parser.add_argument("--out", default="runs/bench/startup.json")
    args = parser.parse_args()
    image = None
    if not args.no_image:
        from components.images import IMAGE_CPU
        from zhllama.core import containers

        image = args.image or containers.local_tag(IMAGE_CPU)
        if containers.docker_host() is None:
            image = None
    results = {} if args.skip_imports else measure(image, args.repeat)
    if args.pretrain:
        results["pretrain to first step"] = measure_pretrain(Path(args.pretrain), image, args.repeat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"image": image, "results": results}, indent=2))
    if results:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
