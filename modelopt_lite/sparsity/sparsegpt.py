"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order (OBS) weight updates.

For a linear ``y = x W^T`` with calibration inputs ``X`` the layer-output error of changing
``W`` is ``tr(dW H dW^T)`` with ``H = 2 X^T X / n``. Columns are processed left to right in
blocks of ``block_size``; inside a block, at the first column of every group of ``m``, the
N:M mask is chosen by the OBS saliency ``w^2 / [H^-1]_jj^2``; each pruned column's error is
spread over the remaining columns of the block through the upper Cholesky factor of
``H^-1``, and once per block the accumulated error updates all later columns (a lazy batch
update). Dampening adds ``percdamp * mean(diag H)`` to the diagonal.

Example::

    acc = HessianAccumulator(in_features=576)
    acc.add(x)                                  # every calibration batch [*, 576]
    w_pruned, mask = sparsegpt_prune(w, acc.hessian(), n=2, m=4)
"""

from __future__ import annotations

import contextlib

import torch

from ..nn.calibrators import all_reduce_
from .masks import check_nm_shape


class HessianAccumulator:
    """Sums ``X^T X`` and counts tokens; :meth:`hessian` all-reduces and returns ``2 X^T X / n``."""

    def __init__(self, in_features: int, device=None):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self._reduced = False

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float32)
        self.xtx.addmm_(x.t(), x)
        self.count += x.shape[0]

    def reduce(self) -> None:
        """Sum the statistics over torch.distributed ranks (once)."""
        if not self._reduced:
            all_reduce_(self.xtx, "sum")
            all_reduce_(self.count, "sum")
            self._reduced = True

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` summed over all torch.distributed ranks."""
        self.reduce()
        if self.count.item() == 0:
            raise ValueError("no calibration tokens reached this layer; check the forward loop")
        return self.xtx * (2.0 / self.count.item())

    def input_sq_sum(self) -> torch.Tensor:
        """``sum_t x_tj^2`` per input channel (the diagonal of ``X^T X``), for Wanda."""
        self.reduce()
        return self.xtx.diagonal().clone()


def _inverse_cholesky_upper(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising the damping until it is positive definite."""
    damp = percdamp * torch.mean(torch.diag(h)).clamp_min(1e-8)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * (10 ** attempt) * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise ValueError("the Hessian is not positive definite even with 10^5x the dampening; "
                     "check the calibration data (NaN/Inf or all-zero inputs)")


@contextlib.contextmanager
def _few_threads(device: torch.device):
    """The column loop is thousands of tiny ops: on CPU one thread beats a contended pool."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, n: int = 2, m: int = 4,
                    block_size: int = 128, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M-prune a 2-D ``[out, in]`` weight with OBS updates; returns ``(w_pruned, mask)``.

    ``h``: the ``[in, in]`` Hessian ``2 X^T X / n``. ``w_pruned`` has ``w``'s dtype and is
    exactly zero where ``mask`` (bool) is False; the kept weights are updated to compensate.
    """
    check_nm_shape(w.shape, m)
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    if block_size % m:
        raise ValueError(f"block_size {block_size} must be a multiple of m={m}")
    with _few_threads(w.device):
        return _sparsegpt(w, h, n, m, block_size, percdamp)


def _sparsegpt(w, h, n, m, block_size, percdamp):
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    hinv = _inverse_cholesky_upper(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        err = _prune_block(W[:, i1:i2], hinv[i1:i2, i1:i2], mask[:, i1:i2], n, m)
        W[:, i2:] -= err.matmul(hinv[i1:i2, i2:])
    W[~mask] = 0.0
    return W.to(w.dtype), mask


def _prune_block(w1: torch.Tensor, hinv1: torch.Tensor, mask1: torch.Tensor, n: int, m: int):
    """Prune one block in place (``w1``, ``mask1`` are views); return its scaled errors."""
    err1 = torch.zeros_like(w1)
    diag = torch.diagonal(hinv1)
    for i in range(w1.shape[1]):
        if i % m == 0:
            saliency = w1[:, i:i + m] ** 2 / diag[i:i + m].unsqueeze(0) ** 2
            keep = torch.topk(saliency, n, dim=1).indices
            mask1[:, i:i + m] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, keep, True)
        col = w1[:, i]
        q = col * mask1[:, i]
        e = (col - q) / diag[i]
        w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)  # in place: no [rows, cols] temporary
        w1[:, i] = q
        err1[:, i] = e
    return err1
