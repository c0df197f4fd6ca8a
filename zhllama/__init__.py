"""zhllama: teach a LLaMA-family model Chinese (the Chinese-LLaMA-Alpaca recipe) as plain functions."""

__version__ = "0.1.0"
