"""Dropout for LoRA's inputs at a lower cost on CPU: the same distribution (each element kept with
probability 1 - p and scaled by 1 / (1 - p)), its mask drawn by numpy's PCG64 instead of
``bernoulli_``, which was 16% of an SFT step and ~10% of a PT step here (peft draws one mask
per adapted module: 7 a layer). The generator is seeded from torch's, so ``torch.manual_seed``
and a resumed run's restored RNG state fix the masks as they fix every other random draw.
"""

from __future__ import annotations

import numpy as np
import torch


class FastDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` with the mask drawn by numpy (CPU tensors in training mode; anything
    else is ``torch.nn.Dropout`` itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return x.mul(keep_mask(x.shape, self.p)).mul_(1.0 / (1.0 - self.p))


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float) -> torch.Tensor:
    """A boolean mask of ``shape``, each element True with probability 1 - p: FastDropout's
    mask (the fused LoRA layer draws its masks here too, so both give the same numbers)."""
    seed = int(torch.randint(0, 2**62, (1,)))  # advances torch's generator, one draw a call
    uniform = np.random.Generator(np.random.PCG64(seed)).random(tuple(shape), dtype=np.float32)
    return torch.from_numpy(uniform >= np.float32(p))


def use_fast_lora_dropout(model: torch.nn.Module) -> int:
    """Swap every peft LoRA layer's ``nn.Dropout`` for ``FastDropout`` of the same p; returns how
    many were swapped."""
    swapped = 0
    for module in model.modules():
        layers = getattr(module, "lora_dropout", None)
        if not isinstance(layers, torch.nn.ModuleDict):
            continue
        for name, layer in list(layers.items()):
            if type(layer) is torch.nn.Dropout:
                layers[name] = FastDropout(layer.p)
                swapped += 1
    return swapped
