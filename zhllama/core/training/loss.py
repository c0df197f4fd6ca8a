"""The causal-LM objective: the sum of next-token cross-entropy over target tokens, and their count.

The training loop (loop.py) takes any objective that returns ``(loss_sum, count)``; this is the
one for language models, with the chunked output-layer loss the benchmarks justify (see
benchmarks/RESULTS.md): for LLaMA-family models the output layer runs only on target positions
and in row chunks, so the [batch, seq, vocab] logits never exist whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
# Output-layer rows a chunk: 256-512 ran the chunked loss ~7-9% faster than 1,024 at the tiny
# model's 51K vocabulary (AVX512 and held to AVX2; benchmarks/RESULTS.md), its logits buffer a
# quarter the size (52 MB against 210 MB).
CHUNK_ROWS = 256
# Vocabulary columns a tile within a chunk (fp32): each tile's logits block (4 MB at 256 rows)
# is written and exponentiated in cache; 4,096 beat 2,048 and 8,192 at both the tiny default's
# and SmolLM2's shapes (benchmarks/RESULTS.md).
VOCAB_TILE = 4096


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows: ids with ``pad_id``, labels with -100, mask 0 over padding."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(hidden @ weight.T, target), in row chunks, with both
    gradients computed chunk by chunk in the forward pass: the [rows, vocab] logits (and their
    softmax and gradient) never exist whole. Same matmuls as the plain path; the softmax runs in
    place in one reused fp32 buffer (one exp pass, no fresh vocabulary-sized allocation per
    chunk). Under CPU bf16 autocast the three matmuls run in bf16 on operands cast once; the
    softmax, the loss and the gradient accumulation stay fp32 (no fp16 logits overflow)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int, grads: bool
    ) -> torch.Tensor:
        need_h = grads and ctx.needs_input_grad[0]  # forward runs with grad mode off: ``grads`` says how it was called
        need_w = grads and ctx.needs_input_grad[1]
        device = hidden.device
        autocast_on = device.type == "cpu" and torch.is_autocast_enabled("cpu")
        compute = torch.get_autocast_dtype("cpu") if autocast_on else weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # the first chunk writes the weight gradient, later ones add to it: no [vocab, hidden] zero
        # fill (unless there is no chunk at all)
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_w else None
        if grad_w is not None and not hidden.shape[0]:
            grad_w.zero_()
        with torch.autocast(device.type, enabled=False):
            h_all, w = hidden.to(compute), weight.to(compute)  # cast once, not per chunk and per use
            chunks = _tiled_chunks if compute == torch.float32 and weight.shape[0] > VOCAB_TILE else _untiled_chunks
            total = chunks(h_all, w, target, chunk, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.scaled = False
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # The gradients were computed in the forward pass; scaling them in place spares a fresh
        # [vocab, hidden] tensor a step (its page faults cost as much as the multiply). So this
        # backward can run once only: a second (retain_graph) would scale them twice.
        if ctx.scaled:
            raise RuntimeError("_LinearCrossEntropy's backward ran twice: retain_graph is not supported")
        ctx.scaled = True
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h.mul_(grad_out) if grad_h is not None else None,
            grad_w.mul_(grad_out) if grad_w is not None else None,
            None,
            None,
            None,
        )


def _untiled_chunks(
    h_all: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    chunk: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> torch.Tensor:
    """The loss sum (and, into ``grad_h`` / ``grad_w``, both gradients) in row chunks, each
    chunk's logits whole in one reused fp32 buffer; ``h_all`` and ``w`` in the compute dtype
    (bf16 under autocast: the products in bf16, the softmax and sums in fp32)."""
    device, compute = h_all.device, h_all.dtype
    rows, vocab = min(chunk, h_all.shape[0]), w.shape[0]
    need_h, need_w = grad_h is not None, grad_w is not None
    total = torch.zeros((), dtype=torch.float32, device=device)
    logits_buf = torch.empty((rows, vocab), dtype=torch.float32, device=device)
    low_buf = torch.empty((rows, vocab), dtype=compute, device=device) if compute != torch.float32 else None
    for start in range(0, h_all.shape[0], chunk):
        h, y = h_all[start : start + chunk], target[start : start + chunk]
        m = h.shape[0]
        logits = logits_buf[:m]
        if low_buf is None:
            torch.mm(h, w.t(), out=logits)
        else:
            logits.copy_(torch.mm(h, w.t(), out=low_buf[:m]))
        picked = logits.gather(1, y[:, None]).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()  # exp(logit - max), in place
        sums = probs.sum(dim=1, keepdim=True)
        total += (top.squeeze(1) + sums.squeeze(1).log() - picked).sum()
        if need_h or need_w:
            probs.div_(sums)  # softmax
            probs[torch.arange(m, device=device), y] -= 1.0  # d loss / d logits
            g = probs if low_buf is None else low_buf[:m].copy_(probs)
            if need_h:
                grad_h[start : start + m] = g @ w
            if need_w:
                if start == 0 and low_buf is None:
                    torch.mm(g.t(), h, out=grad_w)
                elif start == 0:
                    grad_w.copy_(g.t() @ h)
                elif low_buf is None:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += g.t() @ h
    return total


def _tiled_chunks(
    h_all: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    chunk: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> torch.Tensor:
    """The fp32 loss sum (and, into ``grad_h`` / ``grad_w``, both gradients) in row chunks and,
    within a chunk, in vocabulary tiles of VOCAB_TILE columns. Each tile's logits are written to
    their own contiguous block and exponentiated against the tile's own maximum while still in
    cache; the tile's ``exp @ w`` product is taken then too. Once every tile of a chunk is done,
    each (tile, row) gets one factor exp(tile max - row max) / row sum, which turns those
    products into the softmax's and scales the rows of ``h`` for the weight gradient (the
    online-softmax identity). The forward product into [rows, vocab]-wide rows ran at 60-90
    GFLOP/s here against 110-150 into tiles: the whole loss 1.15-1.33x faster (RESULTS.md)."""
    vocab, width = w.shape
    bounds = [(a, min(a + VOCAB_TILE, vocab)) for a in range(0, vocab, VOCAB_TILE)]
    rows = min(chunk, h_all.shape[0])
    flat = torch.empty(rows * vocab, dtype=torch.float32, device=h_all.device)
    tile_max = torch.empty((len(bounds), rows), dtype=torch.float32, device=h_all.device)
    tile_sum = torch.empty_like(tile_max)
    need_h, need_w = grad_h is not None, grad_w is not None
    products = torch.empty((len(bounds), rows, width), dtype=torch.float32, device=h_all.device) if need_h else None
    total = torch.zeros((), dtype=torch.float32, device=h_all.device)
    for start in range(0, h_all.shape[0], chunk):
        h, y = h_all[start : start + chunk], target[start : start + chunk]
        m = h.shape[0]
        tiles = []
        offset = 0
        for t, (a, b) in enumerate(bounds):
            e = flat[offset : offset + m * (b - a)].view(m, b - a)
            offset += m * (b - a)
            torch.mm(h, w[a:b].t(), out=e)
            torch.amax(e, dim=1, out=tile_max[t, :m])
            e.sub_(tile_max[t, :m, None]).exp_()
            torch.sum(e, dim=1, out=tile_sum[t, :m])
            if need_h:
                torch.mm(e, w[a:b], out=products[t, :m])
            tiles.append(e)
        row_max = tile_max[:, :m].amax(0)
        factor = (tile_max[:, :m] - row_max).exp_()  # [tiles, m]
        row_sum = (tile_sum[:, :m] * factor).sum(0)
        w_y = w[y]
        total += (row_max + row_sum.log() - (h * w_y).sum(1)).sum()
        if not (need_h or need_w):
            continue
        factor.div_(row_sum)  # exp(tile max - row max) / row sum: tile exps -> softmax
        if need_h:
            gh = grad_h[start : start + m]
            torch.sum(products[:, :m] * factor[:, :, None], dim=0, out=gh)
            gh.sub_(w_y)  # minus the one-hot: d loss / d logits = softmax - onehot
        if need_w:
            for t, (a, b) in enumerate(bounds):
                scaled_h = h * factor[t, :, None]
                if start == 0:
                    torch.mm(tiles[t].t(), scaled_h, out=grad_w[a:b])
                else:
                    grad_w[a:b].addmm_(tiles[t].t(), scaled_h)
            grad_w.index_add_(0, y, h, alpha=-1.0)
    return total


def plain_output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection when the loss may bypass the model's own logits: a bias-free
    linear head over a ``get_decoder()`` (LLaMA-family). Else None (the generic path)."""
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (
        weight is None
        or getattr(head, "bias", None) is not None
        or getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    ):
        return None
    return head


MIN_SHARED_PREFIX = 16


def shared_prefix_length(input_ids: torch.Tensor, select: torch.Tensor) -> int:
    """How many leading positions every row shares and no row predicts a target from (0 when
    under MIN_SHARED_PREFIX, or one row): those positions' hidden states are the same for every
    row, so they can be computed once. ``select`` marks the targeted positions ([rows, length - 1])."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    length = int(same.long().cumprod(0).sum())
    targeted = select.any(dim=0).nonzero()
    if len(targeted):
        length = min(length, int(targeted[0]))
    length = min(length, input_ids.shape[1] - 1)  # at least one position per row after it
    return length if length >= MIN_SHARED_PREFIX else 0


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropy over target tokens, and their count.

    For LLaMA-family models the output layer runs only on target positions (SFT: the
    response, not the masked prompt) and in row chunks (``_LinearCrossEntropy``), so neither
    the compute nor the memory of the [batch, seq, vocab] logits is spent. Other models take
    the generic path through their logits. A module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, chunk_rows: int = CHUNK_ROWS, share_prefix: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        self.share_prefix = share_prefix

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        count = select.sum()
        head = plain_output_head(self.model)
        if head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
            shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # no copy of the logits
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            return loss, count
        decoder = self.model.get_decoder()
        start = shared_prefix_length(input_ids, select) if self.share_prefix else 0
        if start:
            # The rows' common, untargeted prefix (SFT: the template and the instruction) runs once;
            # its keys and values serve every row (autograd sums the rows' gradients back into it).
            cache = decoder(input_ids=input_ids[:1, :start], use_cache=True).past_key_values
            cache.batch_repeat_interleave(input_ids.shape[0])
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            hidden = decoder(
                input_ids=input_ids[:, start:], attention_mask=mask, past_key_values=cache, use_cache=True
            ).last_hidden_state
            rows = hidden[:, :-1][select[:, start:]]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            rows = hidden[:, :-1][select]
        return _LinearCrossEntropy.apply(
            rows, head.weight, targets[select], self.chunk_rows, torch.is_grad_enabled()
        ), count


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens, and their count."""
    loss_module = (
        model if isinstance(model, (CausalLMLoss, torch.nn.parallel.DistributedDataParallel)) else CausalLMLoss(model)
    )
    loss, count = loss_module(
        input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask")
    )
    return loss, int(count)


class CausalLMObjective:
    """What the loop needs of an objective: the module it trains (DDP wraps it), the loss sum
    and count of a batch, the count before the forward pass (to scale accumulated gradients),
    and the real and padded sizes of a batch (for throughput and the padding share)."""

    def __init__(self, chunk_rows: int = CHUNK_ROWS) -> None:
        self.chunk_rows = chunk_rows

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return CausalLMLoss(model, self.chunk_rows)

    def loss_sum(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(module, batch)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sizes(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return real, batch["input_ids"].numel()
