"""Checkpoints of a training run: the trainable weights by name, optimizer, scheduler and RNG
state, and the loop's position; written whole or not at all (temp dir, rename). A resume whose
model does not fit the checkpoint fails loudly, naming the missing keys."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zhllama.core.io import InputError, atomic_dir, write_json

CHECKPOINT_PREFIX = "checkpoint-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
    ]
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
        raise InputError(
            f"{path}: checkpoint is missing or corrupted ({type(err).__name__}: {err}); delete it to resume from an earlier one"
        ) from None
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
                raise InputError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)} (vocabulary changed?)"
                )
            params[name].copy_(value)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state
