"""N:M sparsity masks as pure tensor functions.

A weight is seen as 2-D ``[out, in]``; an N:M mask keeps the ``n`` largest-scoring entries of
every group of ``m`` consecutive entries along ``in`` (2:4 keeps 2 of 4, the pattern sparse
tensor cores run). Scores: magnitude ``|W|``; Wanda ``|W| * ||X_j||_2`` (the input column's
norm over the calibration tokens, i.e. ``sqrt(diag(X^T X))``).

Example::

    mask = nm_mask(w.abs(), n=2, m=4)          # bool, same shape as w
    assert is_nm_sparse(w * mask, 2, 4)
"""

from __future__ import annotations

import torch


class SparsityPatternError(ValueError):
    """A weight whose shape does not fit the N:M pattern."""


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise SparsityPatternError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    if not 0 < n < m:
        raise SparsityPatternError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def check_nm_shape(shape, m: int, name: str = "weight") -> None:
    """Raise a teaching error when the input dim is not a multiple of ``m``."""
    if len(shape) != 2:
        raise SparsityPatternError(f"{name}: N:M masks need a 2-D [out, in] weight, got {tuple(shape)}")
    if shape[1] % m:
        raise SparsityPatternError(
            f"{name}: input dim {shape[1]} is not a multiple of {m}, so it cannot be split into "
            f"groups of {m} for N:{m} sparsity. Fix: exclude this layer (exclude=['{name}']) or "
            "pad its input features to a multiple of " + str(m))


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool mask keeping the ``n`` highest ``scores`` in each group of ``m`` along dim 1.

    ``scores`` is a 2-D ``[out, in]`` tensor (for magnitude pruning, pass the weight itself: its
    absolute value is taken). Ties are broken by position (lower index kept).
    """
    check_nm_shape(scores.shape, m, "scores")
    groups = scores.detach().abs().float().reshape(scores.shape[0], -1, m)
    keep = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float()


def wanda_scores(w: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``; ``input_sq_sum[j]`` is the sum of ``x_j^2`` over calibration tokens."""
    if input_sq_sum.shape != (w.shape[1],):
        raise ValueError(f"input_sq_sum has shape {tuple(input_sq_sum.shape)}, expected ({w.shape[1]},)")
    return w.detach().abs().float() * input_sq_sum.float().clamp_min(0).sqrt()


def is_nm_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` along dim 1 holds at most ``n`` non-zeros."""
    if w.shape[-1] % m:
        return False
    nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    return bool((nz <= n).all())


def nm_fraction(w: torch.Tensor, n: int = 2, m: int = 4) -> float:
    """Fraction of groups of ``m`` along dim 1 that satisfy the N:M pattern."""
    if w.ndim != 2 or w.shape[-1] % m:
        return 0.0
    nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    return (nz <= n).float().mean().item()
