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
    """Sums ``X^T X`` and counts tokens; :meth:`hessian` all-reduces and returns ``2 X^T X / n``.

    Wide inputs accumulate only the blocks on and above the diagonal (``X^T X`` is
    symmetric), mirrored once at the end: about 5/8 of the products at 4 blocks.
    ``exact=True`` sums each batch's float32 product into a float64 buffer, so the sum does
    not depend on the order of batches or ranks (N ranks reproduce one process).
    """

    def __init__(self, in_features: int, device=None, split: int | None = None,
                 exact: bool = False):
        self.exact = exact
        self.xtx = torch.zeros(in_features, in_features, device=device,
                               dtype=torch.float64 if exact else torch.float32)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self._reduced = False
        k = split if split is not None else (4 if in_features >= 1024 else 1)
        edges = [round(i * in_features / k) for i in range(k + 1)]
        self._spans = [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float32)
        for i, a in enumerate(self._spans):
            xa = x[:, a].t()
            for b in self._spans[i:]:
                if self.exact:
                    self.xtx[a, b] += (xa @ x[:, b]).double()
                else:
                    self.xtx[a, b].addmm_(xa, x[:, b])
        self.count += x.shape[0]

    def _mirror(self) -> None:
        for i, a in enumerate(self._spans):
            for b in self._spans[i + 1:]:
                self.xtx[b, a] = self.xtx[a, b].t()
        self._spans = [slice(0, self.xtx.shape[0])]

    def reduce(self) -> None:
        """Sum the statistics over torch.distributed ranks (once)."""
        if not self._reduced:
            self._mirror()
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


def budget_chunks(items: list, nbytes, budget: int) -> list[list]:
    """``items`` in order, cut into consecutive runs whose ``nbytes(item)`` sum to at most
    ``budget`` (an item larger than the budget gets a run of its own): how much Hessian or
    stacked-weight memory one step of a calibration holds at once."""
    chunks, size = [[]], 0
    for item in items:
        n = nbytes(item)
        if chunks[-1] and size + n > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


def _inverse_cholesky_upper(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U = H^-1``), raising the
    damping until ``H`` is positive definite.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``H = R R^T`` for the upper
    ``R = J L J``, so ``H^-1 = R^-T R^-1`` and ``U = R^-1``: one factorisation and one
    triangular solve.
    """
    damp = percdamp * torch.mean(torch.diag(h)).clamp_min(1e-8)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(6):   # at most two [in, in] matrices beside h, factored in place
        a = h.flip(0, 1)                           # J H J, and J (damp I) J = damp I
        a.diagonal().add_(damp * (10 ** attempt))
        torch.linalg.cholesky_ex(a, out=(a, info))   # a := L
        if info.item() == 0:
            inv = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            torch.linalg.solve_triangular(a, inv, upper=False, out=inv)   # inv := L^-1
            del a
            return inv.flip(0, 1)                  # R^-1 = J L^-1 J
        del a
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
    return _sparsegpt(w, h, n, m, block_size, percdamp)


def _sparsegpt(w, h, n, m, block_size, percdamp):
    # transposed, [in, out]: each input column is a contiguous row, so the column loop's
    # small operations stay cheap
    W = w.detach().float().t().contiguous()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    hinv = _inverse_cholesky_upper(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    cols = W.shape[0]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        with _few_threads(W.device):
            err = _prune_block(W[i1:i2], hinv[i1:i2, i1:i2], mask[i1:i2], n, m)
        if i2 < cols:
            W[i2:] -= hinv[i1:i2, i2:].t() @ err
    W[~mask] = 0.0
    return W.t().to(w.dtype), mask.t()


def _prune_block(w1: torch.Tensor, hinv1: torch.Tensor, mask1: torch.Tensor, n: int, m: int):
    """Prune one block in place; return its scaled errors. Transposed layout: ``w1``,
    ``mask1`` are ``[block, out]`` views (one row per input column).

    One group of ``m`` columns at a time: the group's mask is chosen on its current weights;
    the OBS recursion inside the group, ``e_k = p_k / d_k (w_k - sum_{j<k} U_jk e_j)``
    (``p``: 1 where pruned; ``U``: the block's upper factor of ``H^-1``, ``d`` its diagonal),
    runs over the ``m`` columns for all output rows at once, and the group's errors then
    update the block's later columns in one product (the lazy update of the paper, per group).
    """
    err1 = torch.empty_like(w1)
    diag = torch.diagonal(hinv1)
    cols = w1.shape[0]
    for i in range(0, cols, m):
        j = i + m
        wg, d = w1[i:j], diag[i:j].unsqueeze(1)
        keep = torch.topk(wg.pow(2) / d.pow(2), n, dim=0).indices
        mask_g = torch.zeros_like(wg, dtype=torch.bool).scatter_(0, keep, True)
        scale = (~mask_g).to(wg.dtype) / d  # [m, out]: p_k / d_k
        e = err1[i:j]
        u = hinv1[i:j, i:j]
        e[0] = wg[0] * scale[0]
        for k in range(1, m):
            e[k] = (wg[k] - u[:k, k] @ e[:k]) * scale[k]
        q = (wg - torch.triu(u, diagonal=1).t() @ e) * mask_g
        if j < cols:
            w1[j:] -= hinv1[i:j, j:].t() @ e
        w1[i:j] = q
        mask1[i:j] = mask_g
    return err1
