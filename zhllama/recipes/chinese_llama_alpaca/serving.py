"""The registered model's MLflow pyfunc: alpaca prompt in, answer out, with the recipe's
generation settings as overridable params. (MLflow's transformers flavour needs torchvision,
which has no CPU build here; pyfunc needs nothing beyond the training stack.)"""

from __future__ import annotations

import dataclasses
import json
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from zhllama.core.io import write_json
from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings
from zhllama.recipes.chinese_llama_alpaca.prompts import PROMPT_TEMPLATE, RESPONSE_MARKER, SENTIMENT_INSTRUCTION

SERVING_FILE = "zhllama_serving.json"
# Prompts answered by one batched generate when requests wait together (1: one at a time).
MAX_BATCH = 4
MODEL_ARTIFACT = "model"
INPUT_COLUMNS = ("instruction", "input")
EXAMPLE = {"instruction": [SENTIMENT_INSTRUCTION], "input": ["质量很好，非常满意"]}


def serving_config(settings: GenerationSettings | None = None) -> dict[str, Any]:
    """What a server needs besides the weights: the prompt and the generation settings."""
    return {
        "prompt_template": PROMPT_TEMPLATE,
        "response_marker": RESPONSE_MARKER,
        "generation": dataclasses.asdict(settings or GenerationSettings()),
        "max_batch": MAX_BATCH,
    }


Job = tuple[list[tuple[str, str]], GenerationSettings, Future]


class Batcher:
    """All generation on one thread. The scoring server runs each request on a thread of its
    own; every thread that calls torch gets its own OpenMP team, and idle teams spin on the cores
    the busy one needs (4 clients ran at 0.6-0.86x one client's tokens/s: make bench, section
    serving). Requests that wait together and ask for the same settings are answered by one
    batched call of up to ``max_batch`` prompts, in arrival order; a request alone takes the
    single-prompt path, so its answer does not depend on other clients. The thread ends after
    ``idle_seconds`` without work, and its OpenMP team with it: a process that loaded the model
    once (MLflow's log_model checks the input example that way) keeps no team that slows its
    own torch work (measured: 0.6x)."""

    def __init__(
        self,
        run: Callable[[list[tuple[str, str]], GenerationSettings], list[str]],
        max_batch: int,
        idle_seconds: float = 2.0,
    ) -> None:
        self.run, self.max_batch, self.idle_seconds = run, max(1, max_batch), idle_seconds
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def submit(self, prompts: list[tuple[str, str]], settings: GenerationSettings) -> list[str]:
        future: Future = Future()
        self.jobs.put((prompts, settings, future))
        with self.lock:  # after the put: a thread that saw the queue empty has already said it ends
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="zhllama-generate", daemon=True)
                self.thread.start()
        return future.result()

    def _loop(self) -> None:
        held: list[Job] = []  # taken from the queue while a batch of other settings was built
        while True:
            waiting = held + self._drain(block=not held)
            if not waiting:
                with self.lock:
                    if self.jobs.empty():
                        self.thread = None
                        return
                continue
            first, rest = waiting[0], waiting[1:]
            batch, size, held = [first], len(first[0]), []
            for job in rest:
                if job[1] == first[1] and size + len(job[0]) <= self.max_batch:
                    batch.append(job)
                    size += len(job[0])
                else:
                    held.append(job)
            self._answer(batch)

    def _drain(self, block: bool) -> list[Job]:
        jobs = []
        if block:
            try:
                jobs.append(self.jobs.get(timeout=self.idle_seconds))
            except queue.Empty:
                return []
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _answer(self, batch: list[Job]) -> None:
        prompts = [prompt for job in batch for prompt in job[0]]
        try:
            answers = []
            for start in range(0, len(prompts), self.max_batch):
                answers += self.run(prompts[start : start + self.max_batch], batch[0][1])
        except BaseException as err:  # the requests of this batch fail with it; the thread goes on
            for job in batch:
                job[2].set_exception(err)
            return
        start = 0
        for prompts_of_job, _settings, future in batch:
            future.set_result(answers[start : start + len(prompts_of_job)])
            start += len(prompts_of_job)


class ChineseAlpacaModel(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame (or list of dicts) with ``instruction`` and optional ``input``
    columns and returns one answer string per row."""

    def load_context(self, context) -> None:
        from zhllama.recipes.chinese_llama_alpaca import modeling

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.model = modeling.load_model(model_dir)
        self.tokenizer = modeling.load_tokenizer(model_dir)
        modeling.check_vocab(self.model, self.tokenizer, str(model_dir))
        config = json.loads((model_dir / SERVING_FILE).read_text(encoding="utf-8"))
        self.settings = GenerationSettings(**config["generation"])
        self.batcher = Batcher(self._generate, int(config.get("max_batch", 1)))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:

        settings = self._settings(params)
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        checked = [self._check_row(i, row, settings) for i, row in enumerate(rows)]
        return self.batcher.submit(checked, settings)

    def _generate(self, prompts: list[tuple[str, str]], settings: GenerationSettings) -> list[str]:
        from zhllama.recipes.chinese_llama_alpaca.generation import generate_batch

        return generate_batch(self.model, self.tokenizer, prompts, settings)

    def _settings(self, params: dict[str, Any] | None) -> GenerationSettings:
        """The defaults with the request's params; a bad value is the client's error (400)."""
        given = {k: v for k, v in (params or {}).items() if k in self._fields()}
        try:
            settings = dataclasses.replace(self.settings, **given)
        except (TypeError, ValueError) as err:
            raise _bad_request(f"params: {err}") from None
        limit = self._context_length()
        if not 1 <= settings.max_new_tokens <= limit:
            raise _bad_request(f"params.max_new_tokens must be between 1 and {limit}, got {settings.max_new_tokens}")
        return settings

    def _check_row(self, index: int, row: dict[str, Any], settings: GenerationSettings) -> tuple[str, str]:
        from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt

        instruction, text = row.get("instruction"), row.get("input")
        if not isinstance(instruction, str) or not instruction.strip():
            raise _bad_request(f"row {index}: 'instruction' must be a non-empty string, got {instruction!r}")
        if text is None or (isinstance(text, float) and text != text):  # absent, or NaN where another row has it
            text = ""
        if not isinstance(text, str):
            raise _bad_request(f"row {index}: 'input' must be a string, got {text!r}")
        prompt_tokens = len(self.tokenizer(build_prompt(instruction, text))["input_ids"])
        limit = self._context_length()
        if prompt_tokens + settings.max_new_tokens > limit:
            raise _bad_request(
                f"row {index}: the prompt is {prompt_tokens} tokens; with max_new_tokens {settings.max_new_tokens} "
                f"that exceeds the model's context of {limit} tokens: shorten the input or lower max_new_tokens"
            )
        return instruction, text

    def _context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @staticmethod
    def _fields() -> set[str]:
        return {f.name for f in dataclasses.fields(GenerationSettings)}


def _bad_request(message: str):
    """An error the scoring server answers with 400 and this message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "zhllama_merge.json",
)


def _package_model(model_dir: Path, into: Path) -> Path:
    """The model files plus the serving config (prompt and generation settings), nothing else."""
    target = into / "model"
    target.mkdir()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, target / name)
    for shard in model_dir.glob("model-*.safetensors"):
        shutil.copy2(shard, target / shard.name)
    write_json(target / SERVING_FILE, serving_config())
    return target


def _requirements() -> list[str]:
    from importlib.metadata import version

    packages = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "protobuf", "pandas", "mlflow")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def log_pyfunc_model(model_dir: Path, run_id: str, uri: str):
    """Log the model as an MLflow pyfunc (safetensors weights, tokenizer, prompt, generation
    settings, signature and input example) in ``run_id``; returns its ModelInfo."""
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, DataType, Schema

    import mlflow

    example = pd.DataFrame(EXAMPLE)
    defaults = dataclasses.asdict(GenerationSettings())
    signature = infer_signature(example, ["正面"], params=defaults)
    # 'input' may be left out of a request (the recipe's prompt then has the instruction only)
    signature.inputs = Schema(
        [ColSpec(DataType.string, "instruction"), ColSpec(DataType.string, "input", required=False)]
    )
    mlflow.set_tracking_uri(uri)
    # start_run(run_id=...) refuses a run of another experiment than the process's active one
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory(prefix="zhllama-register-") as tmp, mlflow.start_run(run_id=run_id):
        packaged = _package_model(model_dir, Path(tmp))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ChineseAlpacaModel(),
            artifacts={MODEL_ARTIFACT: str(packaged)},
            code_paths=[str(Path(__file__).resolve().parents[2])],  # the zhllama package: loads without an install
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
        )
