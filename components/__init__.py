"""Kubeflow Pipelines components, one file per stage of the recipe's stage table, written by
``make components`` (zhllama/core/codegen.py); each is an interface plus one call into
``zhllama.recipes.chinese_llama_alpaca.launchers``. images.py names the images they run in."""
