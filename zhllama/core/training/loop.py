"""The one training loop every stage that trains shares (the recipe's pretraining and SFT).

What it guarantees:
* the data order is a pure function of (seed, epoch), and dropout's RNG state is saved in
  each checkpoint, so an interrupted run resumed from its latest checkpoint ends with the
  same weights as an uninterrupted one;
* the objective returns ``(loss_sum, count)`` per batch (tokens for a language model, images
  or pairs for another recipe); the loss of an optimizer step is the sum over all its
  micro-batches (and all ranks) divided by their total count, so gradient accumulation and
  data-parallel training compute the same gradient as one big batch;
* only trainable parameters reach the optimizer (frozen ones are filtered out), and a
  checkpoint holds exactly those by name: resume fails loudly, naming missing keys;
* checkpoints are written whole or not at all (temp dir, rename); with ``durable_uri`` each is
  also mirrored to the object store in the background (durable.py), and the run starts from
  the newest complete one there: a retried step on a fresh pod resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from zhllama.core.config import TrainArgs
from zhllama.core.io import InputError
from zhllama.core.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from zhllama.core.training.loss import CausalLMObjective

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What a recipe trains on: ``loss_sum`` returns (sum of the loss over a batch's counted
    units, their count); see loss.CausalLMObjective for the language-model one."""

    def module(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def loss_sum(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def sizes(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]: ...


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


def batch_order(
    source: BatchSource, global_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
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
    """AdamW over trainable parameters only; no weight decay on biases and norms; each
    parameter at ``cfg.learning_rate_for(name)`` (one group per distinct rate). The fused
    implementation (one kernel over all tensors): on CPU it updates the fully trained 51K x 256
    embed_tokens/lm_head pair in 0.03 s against 0.25 s for the default (benchmarks/RESULTS.md)."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or "norm" in name or getattr(param, "zhllama_no_weight_decay", False))
        groups.setdefault((cfg.learning_rate_for(name), decays), []).append(param)
    if not groups:
        raise ValueError("no trainable parameters: nothing to optimise")
    return torch.optim.AdamW(
        [
            {"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0}
            for (lr, decays), params in groups.items()
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=all(p.device.type in {"cpu", "cuda"} and p.dtype.is_floating_point for ps in groups.values() for p in ps),
    )


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    source: BatchSource,
    batch_size: int,
    world: Dist,
    limit: int = 0,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Mean loss per counted unit over (the first ``limit`` of) ``source``, across ranks."""
    objective = objective or CausalLMObjective()
    was_training = model.training
    model.eval()
    module = objective.module(model)
    n = len(source) if limit <= 0 else min(limit, len(source))
    indices = list(range(n))[world.rank :: world.world_size]
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(0, len(indices), batch_size):
        batch = {key: v.to(world.device) for key, v in source.collate(indices[k : k + batch_size]).items()}
        loss, count = objective.loss_sum(module, batch)
        total += torch.tensor([float(loss), count], dtype=torch.float64)
    _all_reduce_sum(total, world)
    model.train(was_training)
    mean = float(total[0] / max(total[1], 1))
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": int(total[1])}


# --- the loop ---------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    steps: int
    log_history: list[dict[str, Any]]
    metrics: dict[str, Any]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware: a GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX whose kernels are not held below AVX512 (``ATEN_CPU_CAPABILITY``). Where
    this is False, bf16 on CPU is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() not in {"AVX512", "AMX"}:
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device has bf16 matmuls (``native_bf16``), else fp32; other
    values as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def _autocast(precision: str, device: torch.device):
    """bf16 autocast on GPU and on CPU (weights, optimizer state and the loss stay fp32); fp16 on
    GPU only (with loss scaling). Speed-ups are in benchmarks/RESULTS.md."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _prepare(
    model: torch.nn.Module, cfg: TrainArgs, world: Dist, objective: Objective
) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """Seeds, threads, device, gradient checkpointing; the optimizer; the (DDP-wrapped) objective module."""
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
    module = objective.module(model)
    if world.world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )
    return module, optimizer


def _resume(
    run_dir: Path, model: torch.nn.Module, optimizer, scheduler, total_steps: int
) -> tuple[int, list[dict[str, Any]]]:
    """(step, log history) of the latest checkpoint under ``run_dir``, restored into the model,
    optimizer and scheduler; (0, []) when there is none."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        log.info("--resume: no checkpoint under %s, starting fresh", run_dir / "checkpoints")
        return 0, []
    state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
    if state.get("total_steps") != total_steps:
        raise InputError(
            f"{checkpoints[-1]}: made for {state.get('total_steps')} steps, this run has {total_steps}: "
            "keep max_steps/epochs as they were"
        )
    log.info("resumed from %s (step %d)", checkpoints[-1], state["step"])
    return state["step"], state["log_history"]


@dataclasses.dataclass
class _StepResult:
    loss: float
    count: float
    grad_norm: float
    real: int
    padded: int


def _optimizer_step(
    module: torch.nn.Module,
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    cfg: TrainArgs,
    world: Dist,
    objective: Objective,
    optimizer,
    scheduler,
    scaler,
) -> _StepResult:
    """One optimizer step over its micro-batches: the gradient of (loss sum / count) over all of
    them and all ranks, clipped, applied."""
    counts = torch.tensor([float(objective.count(b)) for b in batches], dtype=torch.float64).sum().reshape(1)
    step_count = float(_all_reduce_sum(counts, world)[0])
    loss_sum, real, padded = 0.0, 0, 0
    for a, batch in enumerate(batches):
        batch = {k: v.to(world.device) for k, v in batch.items()}
        sync = a == len(batches) - 1 or world.world_size == 1
        with contextlib.nullcontext() if sync else module.no_sync(), _autocast(cfg.precision, world.device):
            loss, _ = objective.loss_sum(module, batch)
            # DDP averages gradients over ranks: scale so the result is sum/total count.
            scaled = loss * world.world_size / max(step_count, 1.0)
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += float(loss.detach())
        sizes = objective.sizes(batch)
        real, padded = real + sizes[0], padded + sizes[1]
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = (
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
    )
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total_loss = float(_all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64), world)[0])
    return _StepResult(
        loss=total_loss / max(step_count, 1.0), count=step_count, grad_norm=grad_norm, real=real, padded=padded
    )


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
    objective: Objective | None = None,
    eval_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    durable_uri: str = "",
) -> TrainResult:
    """Train ``model`` in place on ``objective`` (default: the causal-LM loss).
    ``stop_after_steps`` ends early (after checkpointing) to simulate an interruption in tests;
    ``on_log`` receives every log entry as it is made (on the main process), e.g. to send step
    metrics to MLflow; ``eval_metrics`` adds the recipe's own figures (e.g. task accuracy) to
    every evaluation, computed on the model in eval mode. ``durable_uri`` (s3://..., one task's
    own prefix) mirrors every checkpoint there and resumes from the newest complete one."""
    from tqdm.auto import tqdm

    from zhllama.core.training.durable import CheckpointStore

    world = world or Dist()
    objective = objective or CausalLMObjective()
    run_dir = Path(run_dir)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, world.device))
        log.info("precision auto -> %s on %s", cfg.precision, world.device)
    module, optimizer = _prepare(model, cfg, world, objective)

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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, int(total_steps * cfg.warmup_ratio))
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and world.device.type == "cuda" else None
    store = CheckpointStore(durable_uri, keep=cfg.save_total_limit) if durable_uri else None
    if store is not None:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per node; its ranks share run_dir
            store.download_latest(run_dir)
        if world.world_size > 1:
            dist.barrier()
        resume = True
    step, history = _resume(run_dir, model, optimizer, scheduler, total_steps) if resume else (0, [])
    resumed_from = step
    # the logged "lr" is that of cfg.learning_rate's group (a recipe may give some parameters their own)
    main_group = next((k for k, g in enumerate(optimizer.param_groups) if g["initial_lr"] == cfg.learning_rate), 0)

    order_cache: dict[int, list[list[int]]] = {}

    def micro_batch(k: int) -> list[int]:
        epoch, pos = divmod(k, batches_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = batch_order(train_source, global_batch, cfg.seed, epoch, group_by_length)
        return order_cache[epoch][pos][world.rank * per_device : (world.rank + 1) * per_device]

    def emit(entry: dict[str, Any]) -> None:
        history.append(entry)
        if on_log and world.is_main:
            on_log(entry)

    def evaluation() -> dict[str, float]:
        scores = evaluate_loss(model, eval_source, cfg.per_device_eval_batch_size, world, max_eval, objective)
        if eval_metrics is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                scores.update(eval_metrics(model))
            model.train(was_training)
        return scores

    real_seen = padded_seen = 0
    started = time.perf_counter()
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not world.is_main, mininterval=2.0)
    while step < total_steps:
        micro = [
            micro_batch(step * cfg.gradient_accumulation_steps + a) for a in range(cfg.gradient_accumulation_steps)
        ]
        done = _optimizer_step(
            module,
            model,
            [train_source.collate(idx) for idx in micro],
            cfg,
            world,
            objective,
            optimizer,
            scheduler,
            scaler,
        )
        real_seen, padded_seen = real_seen + done.real, padded_seen + done.padded
        step += 1
        if not math.isfinite(done.loss):
            raise FloatingPointError(
                f"loss became {done.loss} at step {step}: lower the learning rate; on GPU prefer --precision bf16 to fp16"
            )
        entry = {
            "step": step,
            "loss": done.loss,
            "lr": scheduler.get_last_lr()[main_group],
            "grad_norm": done.grad_norm,
            "tokens": int(done.count),
        }
        emit(entry)
        progress.update(1)
        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - started
            progress.set_postfix(loss=f"{done.loss:.3f}", lr=f"{entry['lr']:.2e}")
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                step,
                total_steps,
                done.loss,
                entry["lr"],
                real_seen * world.world_size / max(elapsed, 1e-9),
            )
        if eval_source is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            figures = evaluation()
            log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
            emit({"step": step, **figures})
        if cfg.save_steps and (
            step % cfg.save_steps == 0 or (stop_after_steps is not None and step == stop_after_steps)
        ):
            if world.is_main:
                saved = save_checkpoint(
                    run_dir,
                    model,
                    optimizer,
                    scheduler,
                    {"step": step, "total_steps": total_steps, "log_history": history},
                    cfg.save_total_limit,
                )
                if store is not None:
                    store.submit(saved)
            if world.world_size > 1:
                dist.barrier()
        if stop_after_steps is not None and step >= stop_after_steps:
            break
    progress.close()
    elapsed = time.perf_counter() - started
    if store is not None and world.is_main:
        store.close()
    metrics: dict[str, Any] = {
        "resumed_from_step": resumed_from,
        **(store.summary() if store is not None and world.is_main else {}),
        "steps": step,
        "total_steps": total_steps,
        "train_seconds": elapsed,
        "train_loss_first": next((h["loss"] for h in history if "loss" in h), None),
        "train_loss_last": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "tokens_per_second": real_seen * world.world_size / max(elapsed, 1e-9),
        "padding_share": 1.0 - real_seen / max(padded_seen, 1),
        "trained_tokens": sum(h.get("tokens", 0) for h in history if "loss" in h),
        "world_size": world.world_size,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }
    if eval_source is not None and step >= total_steps:
        final_eval = evaluation()
        emit({"step": step, **final_eval})
        metrics.update(final_eval)
    return TrainResult(steps=step, log_history=history, metrics=metrics)
