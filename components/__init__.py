"""Kubeflow Pipelines components, one per stage, each an interface plus one call into
``zhllama.recipes.chinese_llama_alpaca.launchers`` (see _factory.py for how the parameters come from the config dataclasses)."""
