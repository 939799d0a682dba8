"""Data-parallel calibration over ``torch.distributed`` ranks (gloo on CPU, NCCL on GPU).

Each rank runs the calibration forward passes on its own shard of the data; every statistic
is reduced across ranks **before** any decision is taken from it, so every rank ends with the
identical quantized model. The rule for algorithm authors:

- running maxima (absmax, amax)            -> :func:`reduce_max_`
- sums and counts (abssum, ``X^T X``, n)   -> :func:`reduce_sum_`
- search losses (one per candidate)        -> :func:`reduce_sum_` / :func:`reduce_sum` on the
  **sum** of errors (not a per-rank mean: ranks may hold different numbers of tokens), and
  only then take the argmin.
- a ratio of sums (relative error)          -> reduce numerator and denominator, then divide.
- a subset of batches (search batches)      -> choose by global index (:func:`global_offset`).

Identical to one process, bit for bit, when batches have the same shapes on every rank (each
batch's forward is then the same computation) and sums accumulate per-batch float32 partials
in float64 (exact at calibration sizes, so the order of the sum does not matter).

Without an initialised process group (or with one rank) every helper is a no-op, so the same
code runs in one process. Example (``torchrun --nproc_per_node 2 calibrate.py``)::

    dist.init_process_group("nccl")
    torch.cuda.set_device(local_rank())
    tokens = shard_tokens(calib_tokens(texts, tok, n_samples=128, seq_len=512))
    model = mtl.quantize(model, "int4_awq", calib=tokens)   # identical on every rank
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..nn.calibrators import all_reduce_


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """True when a process group with more than one rank exists."""
    return world_size() > 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def local_rank() -> int:
    """This process's GPU index on its host (``LOCAL_RANK`` from torchrun, else the rank)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d and d.get_world_size() > 1:
        d.barrier()


def shard_tokens(tokens: torch.Tensor, rank_: int | None = None,
                 world_size_: int | None = None) -> torch.Tensor:
    """This rank's contiguous share of ``[n_samples, seq_len]`` calibration tokens.

    Shares differ by at most one sample; their union, in rank order, is ``tokens``.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    if tokens.shape[0] < w:
        raise ValueError(f"{tokens.shape[0]} calibration sample(s) cannot be shared by {w} ranks; "
                         f"use at least {w} samples (one per rank) or fewer ranks")
    return torch.tensor_split(tokens, w)[r]


def _collective_device(t: torch.Tensor) -> torch.device:
    d = _dist()
    if d and d.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _reduce_(t: torch.Tensor, op: str, dtype=None) -> torch.Tensor:
    if not is_distributed():
        return t
    dev = _collective_device(t)
    work = t.to(device=dev, dtype=dtype or t.dtype).contiguous()
    all_reduce_(work, op)
    if work is not t:
        t.copy_(work)
    return t


def reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise maximum over ranks."""
    return _reduce_(t, "max")


def reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise sum over ranks (accumulated in float64 for float inputs)."""
    dtype = torch.float64 if t.is_floating_point() else None
    return _reduce_(t, "sum", dtype)


def reduce_sum(x: float) -> float:
    """The sum over ranks of a Python number (e.g. one candidate's search loss)."""
    if not is_distributed():
        return x
    return reduce_sum_(torch.tensor([float(x)], dtype=torch.float64)).item()


def global_offset(count: int) -> tuple[int, int]:
    """``(first, total)``: where this rank's ``count`` local items start in the sequence of all
    ranks' items (rank order, as :func:`shard_tokens` splits them), and how many there are.

    Lets an algorithm choose a subset of calibration batches by **global** index, so that N
    ranks search on the same batches as one process on the union of their data.
    """
    if not is_distributed():
        return 0, count
    counts = torch.zeros(world_size(), dtype=torch.float64)
    counts[rank()] = count
    c = [int(v) for v in reduce_sum_(counts).tolist()]
    return sum(c[:rank()]), sum(c)


def local_indices(picks, first: int, count: int) -> list[int]:
    """The global indices ``picks`` that fall in ``[first, first + count)``, made local."""
    return [g - first for g in picks if first <= g < first + count]


def reduce_mean_(t: torch.Tensor, count: float) -> torch.Tensor:
    """In place: the mean over all ranks' samples of ``t``, a mean over this rank's ``count``."""
    if not is_distributed():
        return t
    total = reduce_sum(float(count))
    t.mul_(count)
    reduce_sum_(t)
    return t.div_(max(total, 1e-30))


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank ``src``'s value on every rank."""
    d = _dist()
    if not (d and d.get_world_size() > 1):
        return t
    work = t.to(_collective_device(t))
    d.broadcast(work, src)
    if work is not t:
        t.copy_(work)
    return t


def mismatched_tensors(model: nn.Module) -> list[str]:
    """Names of parameters/buffers that differ between ranks (empty: the model is identical).

    Compares the element-wise max and min over ranks; a debugging check after calibration.
    """
    if not is_distributed():
        return []
    bad = []
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in state.items():
        if t.is_meta or t.numel() == 0:
            continue
        x = t.detach().double()
        hi, lo = reduce_max_(x.clone()), reduce_max_(-x)
        if not torch.equal(hi, -lo):
            bad.append(name)
    return bad
