"""peft's LoRA linear layer, training forward and backward fused into one autograd function.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as six autograd nodes. Two of
them (the scaling multiply and the add) pass over the whole [tokens, out] output, and their
backward passes over it again. Autograd also adds the base path's and the LoRA path's input
gradients as two separate tensors, and computes lora_B's weight gradient as
``grad.t() @ a``: a [out, tokens] x [tokens, r] product, which runs 2-3x slower on CPU than
the same arithmetic as ``(a.t() @ grad).t()``. This function does the same arithmetic:

- forward: ``x @ W.t()`` and then ``addmm_(a, B.t(), alpha=scaling)`` into that output;
- backward: one ``[tokens, in]`` input gradient, with the LoRA term added in place through the
  dropout mask (``addcmul_``).

It saves what peft saves: the dropped-out input, the rank-r activations and the boolean
mask. The dropout masks come from ``FastDropout``'s generator, so the masks and the numbers
are those of the unfused layer (within float rounding of the fused add).

The fused path runs only for plain training on CPU: one active adapter, vanilla LoRA, a frozen
``nn.Linear`` base, fp32, no autocast. Anything else goes through peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from zhllama.core.training.dropout import FastDropout, keep_mask


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        keep: torch.Tensor | None,
        keep_scale: float,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        if keep is None:
            dropped = x2
        else:
            keep = keep.reshape(x2.shape)
            dropped = x2.mul(keep).mul_(keep_scale)
        a = torch.mm(dropped, lora_a.t())
        out.addmm_(a, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(weight, lora_a, lora_b, dropped, a, keep)
        ctx.scaling, ctx.keep_scale, ctx.shape = scaling, keep_scale, shape
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        weight, lora_a, lora_b, dropped, a, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gb = torch.mm(g, lora_b).mul_(ctx.scaling)  # [tokens, r]: d loss / d a
        grad_b = torch.mm(a.t(), g).t().mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_a = torch.mm(gb.t(), dropped) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)
            lora_term = torch.mm(gb, lora_a)
            if keep is None:
                grad_x.add_(lora_term)
            else:
                grad_x.addcmul_(lora_term, keep, value=ctx.keep_scale)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fusable(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active vanilla adapter's name when the fused path computes exactly what peft's
    forward would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or x.device.type != "cpu":
        return None
    if not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    dtypes = {x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
    if dtypes != {torch.float32}:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (FastDropout, torch.nn.Identity)) or getattr(dropout, "inplace", False):
        return None
    return name


def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    dropout = self.lora_dropout[name] if name is not None else None
    p = dropout.p if isinstance(dropout, FastDropout) and dropout.training else 0.0
    if name is None or p >= 1.0:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    keep = keep_mask(x.shape, p) if p > 0.0 else None
    return _LoraLinear.apply(
        x,
        base.weight,
        base.bias,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        keep,
        1.0 / (1.0 - p),
    )


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused training forward (falling back to
    peft's own whenever it does not apply); returns how many layers were changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in module.__dict__:
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
