"""A plain PyTorch training loop for QAT and sparse fine-tuning, with checkpoint/resume.

Users with their own loop only need the two hooks around ``optimizer.step()``::

    loss.backward()
    before_optimizer_step(model)   # zero gradients of pruned weights
    optimizer.step()
    after_optimizer_step(model)    # re-apply masks, count the step, freeze ranges on schedule

:func:`fit` is that loop, with autocast, gradient clipping and checkpoints (model weights,
optimizer, quantizer state) that a second call with the same ``checkpoint_dir`` resumes from.

Example::

    model = prepare_qat(model, "int4_weight_only_sym")
    losses = fit(model, batches, torch.optim.AdamW(model.parameters(), 1e-5), steps=200)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..qat import after_optimizer_step, before_optimizer_step, load_qat_state, save_qat_state

logger = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """A dict batch is passed as keyword arguments; a token tensor is its own label."""
    out = model(**batch) if isinstance(batch, dict) else model(input_ids=batch, labels=batch)
    return out.loss if hasattr(out, "loss") else out


def fit(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, steps: int, *,
        loss_fn: Callable | None = None, scheduler=None, autocast_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None, checkpoint_dir=None, save_every: int | None = None,
        progress: bool = True) -> list[float]:
    """Train for ``steps`` optimizer steps (cycling over ``batches``); returns the losses.

    With ``checkpoint_dir``, a checkpoint is written every ``save_every`` steps and at the end,
    and a later call resumes from the one found there (skipping the batches already seen).
    """
    loss_fn = loss_fn or default_loss
    start = load_checkpoint(model, optimizer, scheduler, checkpoint_dir) if checkpoint_dir else 0
    data = itertools.islice(itertools.cycle(batches), start, None)
    model.train()
    losses = []
    for step in tqdm(range(start, steps), desc="QAT", disable=not progress):
        losses.append(train_step(model, next(data), optimizer, loss_fn, autocast_dtype,
                                 max_grad_norm))
        if scheduler is not None:
            scheduler.step()
        done = step + 1
        if checkpoint_dir and (done == steps or (save_every and done % save_every == 0)):
            save_checkpoint(model, optimizer, scheduler, checkpoint_dir, done)
    return losses


def train_step(model, batch, optimizer, loss_fn, autocast_dtype=None, max_grad_norm=None) -> float:
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_fn(model, batch)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    before_optimizer_step(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_optimizer_step(model)
    return loss.item()


def save_checkpoint(model, optimizer, scheduler, directory, step: int) -> None:
    """Model tensors (safetensors), optimizer/scheduler state, quantizer state, step count."""
    from safetensors.torch import save_file

    from ..io import _atomic_write_text, _unique_state

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _replace(directory / MODEL_FILE, lambda p: save_file(_unique_state(model), str(p)))
    state = {"optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    _replace(directory / OPTIM_FILE, lambda p: torch.save(state, p))
    save_qat_state(model, directory)
    _atomic_write_text(directory / LOOP_STATE, json.dumps({"step": step}))


def load_checkpoint(model, optimizer, scheduler, directory) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; the step to resume at (0: none)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / LOOP_STATE).exists():
        return 0
    load_qat_state(model, directory)
    missing, unexpected = model.load_state_dict(load_file(str(directory / MODEL_FILE)),
                                                strict=False)
    if unexpected:
        raise ValueError(f"{directory}: checkpoint tensors not in the model: {unexpected[:5]}")
    state = torch.load(directory / OPTIM_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    step = json.loads((directory / LOOP_STATE).read_text())["step"]
    logger.info("resumed QAT from %s at step %d", directory, step)
    return step


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
