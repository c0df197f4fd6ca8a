"""Kubeflow Pipelines components, one per stage, each an interface plus one call into
``zhllama.steps`` (see _factory.py for how the parameters come from the config dataclasses)."""
