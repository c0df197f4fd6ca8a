"""The training loop any recipe can use: an objective returns (loss_sum, count)."""
