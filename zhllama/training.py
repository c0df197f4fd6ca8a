"""The one training loop that pretraining and SFT share.

What it guarantees:
* the data order is a pure function of (seed, epoch), and dropout's RNG state is saved in
  each checkpoint, so an interrupted run resumed from its latest checkpoint ends with the
  same weights as an uninterrupted one;
* the loss of an optimizer step is the sum of token losses over all its micro-batches (and
  all ranks) divided by their total target-token count, so gradient accumulation and
  data-parallel training compute the same gradient as one big batch;
* only trainable parameters reach the optimizer (frozen ones are filtered out), and a
  checkpoint holds exactly those by name: resume fails loudly, naming missing keys;
* checkpoints are written whole or not at all (temp dir, rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from zhllama.config import TrainArgs
from zhllama.io import InputError, atomic_dir, write_json

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINT_PREFIX = "checkpoint-"


class BatchSource(Protocol):
    """Training examples the loop can order and collate."""

    def __len__(self) -> int: ...

    def lengths(self) -> Sequence[int]: ...

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


# --- distributed ------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(rank=rank, world_size=world, device=device)


def _all_reduce_sum(value: torch.Tensor, world: Dist) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# --- ordering, schedule -----------------------------------------------------------------------

def batch_order(source: BatchSource, global_batch: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's global batches, a pure function of (seed, epoch). With ``group_by_length``,
    examples are shuffled, cut into mega-batches of 50 batches, sorted by length inside each,
    then the batches are shuffled: similar lengths share a batch, so little padding."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(source), generator=gen).tolist()
    if group_by_length:
        lengths = source.lengths()
        mega = global_batch * 50
        perm = [i for k in range(0, len(perm), mega) for i in sorted(perm[k : k + mega], key=lambda j: -lengths[j])]
    batches = [perm[k : k + global_batch] for k in range(0, len(perm), global_batch)]
    batches = [b for b in batches if len(b) == global_batch]  # drop the ragged tail: equal work per rank
    if group_by_length:
        order = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in order]
    return batches


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainArgs) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: nothing to optimise")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


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
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int, grads: bool) -> torch.Tensor:
        need_h = grads and ctx.needs_input_grad[0]  # forward runs with grad mode off: ``grads`` says how it was called
        need_w = grads and ctx.needs_input_grad[1]
        device = hidden.device
        autocast_on = device.type == "cpu" and torch.is_autocast_enabled("cpu")
        compute = torch.get_autocast_dtype("cpu") if autocast_on else weight.dtype
        rows, vocab = min(chunk, hidden.shape[0]), weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
        with torch.autocast(device.type, enabled=False):
            h_all, w = hidden.to(compute), weight.to(compute)  # cast once, not per chunk and per use
            logits_buf = torch.empty((rows, vocab), dtype=torch.float32, device=device)
            low_buf = torch.empty((rows, vocab), dtype=compute, device=device) if compute != torch.float32 else None
            for start in range(0, hidden.shape[0], chunk):
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
                        if low_buf is None:
                            grad_w.addmm_(g.t(), h)
                        else:
                            grad_w += g.t() @ h
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None, grad_w * grad_out if grad_w is not None else None, None, None, None)


def _plain_output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection when the loss may bypass the model's own logits: a bias-free
    linear head over a ``get_decoder()`` (LLaMA-family). Else None (the generic path)."""
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or getattr(head, "bias", None) is not None or getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return None
    return head


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropy over target tokens, and their count.

    For LLaMA-family models the output layer runs only on target positions (SFT: the
    response, not the masked prompt) and in row chunks (``_LinearCrossEntropy``), so neither
    the compute nor the memory of the [batch, seq, vocab] logits is spent. Other models take
    the generic path through their logits. A module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, chunk_rows: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        count = select.sum()
        head = _plain_output_head(self.model)
        if head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
            shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # no copy of the logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            return loss, count
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = hidden[:, :-1][select]
        return _LinearCrossEntropy.apply(rows, head.weight, targets[select], self.chunk_rows, torch.is_grad_enabled()), count


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens, and their count."""
    loss_module = model if isinstance(model, (CausalLMLoss, torch.nn.parallel.DistributedDataParallel)) else CausalLMLoss(model)
    loss, count = loss_module(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"))
    return loss, int(count)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, source: BatchSource, batch_size: int, world: Dist, limit: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    n = len(source) if limit <= 0 else min(limit, len(source))
    indices = list(range(n))[world.rank :: world.world_size]
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(0, len(indices), batch_size):
        batch = {key: v.to(world.device) for key, v in source.collate(indices[k : k + batch_size]).items()}
        loss, count = token_loss_sum(model, batch)
        total += torch.tensor([float(loss), count], dtype=torch.float64)
    _all_reduce_sum(total, world)
    model.train(was_training)
    mean = float(total[0] / max(total[1], 1))
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": int(total[1])}


# --- checkpoints ------------------------------------------------------------------------------

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict[str, Any], keep: int) -> Path:
    target = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state['step']}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        write_json(tmp / "state.json", state)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore a checkpoint into the model, optimizer and scheduler; the key sets must match."""
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "trainable.safetensors"))
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        rng = torch.load(path / "rng.pt", weights_only=False)
    except Exception as err:  # truncated or foreign files
        raise InputError(f"{path}: checkpoint is missing or corrupted ({type(err).__name__}: {err}); delete it to resume from an earlier one") from None
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise InputError(
            f"{path}: checkpoint does not fit this run: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (was it made with other LoRA targets or stage?)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise InputError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)} (vocabulary changed?)")
            params[name].copy_(value)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


# --- the loop ---------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    steps: int
    log_history: list[dict[str, Any]]
    metrics: dict[str, Any]


def _autocast(precision: str, device: torch.device):
    """bf16 autocast on GPU and on CPU (AVX512-BF16/AMX run its matmuls 2-3x faster than fp32;
    weights, optimizer state and the loss stay fp32); fp16 on GPU only (with loss scaling)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train(
    model: torch.nn.Module,
    train_source: BatchSource,
    eval_source: BatchSource | None,
    cfg: TrainArgs,
    run_dir: str | os.PathLike[str],
    resume: bool = False,
    group_by_length: bool = False,
    world: Dist | None = None,
    max_eval: int = 0,
    stop_after_steps: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place. ``stop_after_steps`` ends early (after checkpointing) to
    simulate an interruption in tests; ``on_log`` receives every log entry as it is made
    (on the main process), e.g. to send step metrics to MLflow."""
    from tqdm.auto import tqdm

    world = world or Dist()
    run_dir = Path(run_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(world.device)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    optimizer = build_optimizer(model, cfg)
    ddp_model: torch.nn.Module = CausalLMLoss(model)
    if world.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=[world.device.index] if world.device.type == "cuda" else None)

    per_device = cfg.per_device_train_batch_size
    global_batch = per_device * world.world_size
    batches_per_epoch = len(batch_order(train_source, global_batch, cfg.seed, 0, group_by_length))
    if batches_per_epoch < cfg.gradient_accumulation_steps:
        raise InputError(
            f"training data gives {batches_per_epoch} batches of {global_batch} per epoch, fewer than one optimizer step "
            f"({cfg.gradient_accumulation_steps} micro-batches): add data or lower the batch size"
        )
    steps_per_epoch = batches_per_epoch // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or max(1, int(steps_per_epoch * cfg.num_train_epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, int(total_steps * cfg.warmup_ratio)))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and world.device.type == "cuda" else None

    step, history = 0, []
    if resume:
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
            step, history = state["step"], state["log_history"]
            if state.get("total_steps") != total_steps:
                raise InputError(f"{checkpoints[-1]}: made for {state.get('total_steps')} steps, this run has {total_steps}: keep max_steps/epochs as they were")
            log.info("resumed from %s (step %d)", checkpoints[-1], step)
        else:
            log.info("--resume: no checkpoint under %s, starting fresh", run_dir / "checkpoints")

    order_cache: dict[int, list[list[int]]] = {}

    def micro_batch(k: int) -> list[int]:
        epoch, pos = divmod(k, batches_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = batch_order(train_source, global_batch, cfg.seed, epoch, group_by_length)
        return order_cache[epoch][pos][world.rank * per_device : (world.rank + 1) * per_device]

    tokens_seen = padded_seen = 0
    started = time.perf_counter()
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not world.is_main, mininterval=2.0)
    while step < total_steps:
        micro = [micro_batch(step * cfg.gradient_accumulation_steps + a) for a in range(cfg.gradient_accumulation_steps)]
        batches = [train_source.collate(idx) for idx in micro]
        counts = torch.tensor([float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]).sum().reshape(1)
        step_tokens = float(_all_reduce_sum(counts.to(torch.float64), world)[0])
        loss_sum = 0.0
        for a, batch in enumerate(batches):
            batch = {k: v.to(world.device) for k, v in batch.items()}
            sync = a == len(batches) - 1 or world.world_size == 1
            ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            with ctx, _autocast(cfg.precision, world.device):
                loss, _ = token_loss_sum(ddp_model, batch)
                # DDP averages gradients over ranks: scale so the result is sum/total tokens.
                scaled = loss * world.world_size / max(step_tokens, 1.0)
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += float(loss.detach())
            tokens_seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            padded_seen += batch["input_ids"].numel()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = float(_all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64), world)[0]) / max(step_tokens, 1.0)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step}: lower the learning rate; on GPU prefer --precision bf16 to fp16")
        entry = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": int(step_tokens)}
        history.append(entry)
        if on_log and world.is_main:
            on_log(entry)
        progress.update(1)
        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - started
            progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{entry['lr']:.2e}")
            log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", step, total_steps, step_loss, entry["lr"], tokens_seen * world.world_size / max(elapsed, 1e-9))
        if eval_source is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            history.append({"step": step, **evaluate_loss(model, eval_source, cfg.per_device_eval_batch_size, world, max_eval)})
            if on_log and world.is_main:
                on_log(history[-1])
        if cfg.save_steps and (step % cfg.save_steps == 0 or (stop_after_steps is not None and step == stop_after_steps)):
            state = {"step": step, "total_steps": total_steps, "log_history": history}
            if world.is_main:
                save_checkpoint(run_dir, model, optimizer, scheduler, state, cfg.save_total_limit)
            if world.world_size > 1:
                dist.barrier()
        if stop_after_steps is not None and step >= stop_after_steps:
            break
    progress.close()
    elapsed = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "steps": step,
        "total_steps": total_steps,
        "train_seconds": elapsed,
        "train_loss_first": next((h["loss"] for h in history if "loss" in h), None),
        "train_loss_last": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "tokens_per_second": tokens_seen * world.world_size / max(elapsed, 1e-9),
        "padding_share": 1.0 - tokens_seen / max(padded_seen, 1),
        "trained_tokens": sum(h.get("tokens", 0) for h in history if "loss" in h),
        "world_size": world.world_size,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }
    if eval_source is not None and step >= total_steps:
        final_eval = evaluate_loss(model, eval_source, cfg.per_device_eval_batch_size, world, max_eval)
        history.append({"step": step, **final_eval})
        metrics.update(final_eval)
        if on_log and world.is_main:
            on_log(history[-1])
    return TrainResult(steps=step, log_history=history, metrics=metrics)
