"""A short, time-bounded, mask-keeping causal-LM fine-tune (plain PyTorch loop).

Only the decoder layers train (embeddings and the tied head stay frozen); after every
optimizer step ``apply_masks_`` re-applies each ``weight_mask``, so the 2:4 pattern holds.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from modelopt_lite.models import find_decoder_layers
from modelopt_lite.plugins.masks import apply_masks_, mask_grads_

log = logging.getLogger("finetune")


def sparse_finetune(model, tokens: torch.Tensor, seconds: float = 240, lr: float = 5e-5,
                    max_steps: int | None = None, warmup: int = 4) -> dict:
    """Train on rows of ``tokens`` (one row per step) until ``seconds`` or ``max_steps``."""
    _, layers = find_decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in layers.parameters() if p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = max_steps or tokens.shape[0]
    est_total = steps
    model.train()
    start, step, losses = time.perf_counter(), 0, []
    while step < steps and time.perf_counter() - start < seconds:
        row = tokens[step % tokens.shape[0]].unsqueeze(0)
        for g in opt.param_groups:  # linear warmup, then cosine over the expected steps
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(est_total, 1), 1.0)))
        loss = model(row, labels=row).loss
        loss.backward()
        mask_grads_(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        apply_masks_(model)
        losses.append(loss.item())
        step += 1
        if step == 2:  # estimate how many steps fit the time budget, for the schedule
            per = (time.perf_counter() - start) / 2
            est_total = min(steps, int(seconds / per))
        if step % 10 == 0:
            log.info("step %d loss %.3f", step, sum(losses[-10:]) / len(losses[-10:]))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "seconds": time.perf_counter() - start, "losses": losses}
