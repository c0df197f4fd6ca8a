"""The registered model's MLflow pyfunc: alpaca prompt in, answer out, with the recipe's
generation settings as overridable params. (MLflow's transformers flavour needs torchvision,
which has no CPU build here; pyfunc needs nothing beyond the training stack.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from zhllama.generation import GenerationSettings
from zhllama.prompts import PROMPT_TEMPLATE, RESPONSE_MARKER, SENTIMENT_INSTRUCTION

SERVING_FILE = "zhllama_serving.json"
MODEL_ARTIFACT = "model"
INPUT_COLUMNS = ("instruction", "input")
EXAMPLE = {"instruction": [SENTIMENT_INSTRUCTION], "input": ["质量很好，非常满意"]}


def serving_config(settings: GenerationSettings | None = None) -> dict[str, Any]:
    """What a server needs besides the weights: the prompt and the generation settings."""
    return {"prompt_template": PROMPT_TEMPLATE, "response_marker": RESPONSE_MARKER,
            "generation": dataclasses.asdict(settings or GenerationSettings())}


class ChineseAlpacaModel(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame (or list of dicts) with ``instruction`` and optional ``input``
    columns and returns one answer string per row."""

    def load_context(self, context) -> None:
        from zhllama import modeling

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.model = modeling.load_model(model_dir)
        self.tokenizer = modeling.load_tokenizer(model_dir)
        modeling.check_vocab(self.model, self.tokenizer, str(model_dir))
        config = json.loads((model_dir / SERVING_FILE).read_text(encoding="utf-8"))
        self.settings = GenerationSettings(**config["generation"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from zhllama.generation import generate

        settings = dataclasses.replace(self.settings, **{k: v for k, v in (params or {}).items() if k in self._fields()})
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
