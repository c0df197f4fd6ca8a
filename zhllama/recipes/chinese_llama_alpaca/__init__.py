"""The Chinese-LLaMA-Alpaca recipe: vocabulary extension, LoRA pretraining, SFT, merges, evaluation."""
