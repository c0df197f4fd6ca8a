"""The registered model's MLflow pyfunc: alpaca prompt in, answer out, with the recipe's
generation settings as overridable params. (MLflow's transformers flavour needs torchvision,
which has no CPU build here; pyfunc needs nothing beyond the training stack.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from zhllama.core.io import write_json
from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings
from zhllama.recipes.chinese_llama_alpaca.prompts import PROMPT_TEMPLATE, RESPONSE_MARKER, SENTIMENT_INSTRUCTION

SERVING_FILE = "zhllama_serving.json"
MODEL_ARTIFACT = "model"
INPUT_COLUMNS = ("instruction", "input")
EXAMPLE = {"instruction": [SENTIMENT_INSTRUCTION], "input": ["质量很好，非常满意"]}


def serving_config(settings: GenerationSettings | None = None) -> dict[str, Any]:
    """What a server needs besides the weights: the prompt and the generation settings."""
    return {
        "prompt_template": PROMPT_TEMPLATE,
        "response_marker": RESPONSE_MARKER,
        "generation": dataclasses.asdict(settings or GenerationSettings()),
    }


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

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from zhllama.recipes.chinese_llama_alpaca.generation import generate

        settings = dataclasses.replace(
            self.settings, **{k: v for k, v in (params or {}).items() if k in self._fields()}
        )
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        answers = []
        for row in rows:
            if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise ValueError(f"each row needs a non-empty 'instruction' string, got {row!r}")
            answers.append(generate(self.model, self.tokenizer, row["instruction"], row.get("input") or "", settings))
        return answers

    @staticmethod
    def _fields() -> set[str]:
        return {f.name for f in dataclasses.fields(GenerationSettings)}


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

    import mlflow

    example = pd.DataFrame(EXAMPLE)
    defaults = {k: v for k, v in GenerationSettings().__dict__.items()}
    signature = infer_signature(example, ["正面"], params=defaults)
    mlflow.set_tracking_uri(uri)
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
