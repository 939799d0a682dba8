"""GPTQ rounding vs an independent float64 OBS reference (explicit inverse Hessian, updated
by row/column elimination after every column: no Cholesky, no lazy batches)."""

import pytest
import torch

from modelopt_lite.algorithms.awq_search import qdq_weight, weight_range
from modelopt_lite.algorithms.gptq import gptq_round
from modelopt_lite.config import QuantizerSpec


def _reference(w, h, spec, amin, amax, percdamp, mask=None):
    w = w.double().clone()
    h = h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q_all = torch.empty_like(w)
    width = spec.block_size if spec.granularity == "per_block" else w.shape[1]
    for j in range(w.shape[1]):
        b = j // width
        lo = None if amin is None else amin[:, b:b + 1]
        col = qdq_weight(w[:, j:j + 1], QuantizerSpec(num_bits=spec.num_bits,
                                                     granularity="per_channel",
                                                     symmetric=spec.symmetric,
                                                     integer_zero=spec.integer_zero),
                         lo, amax[:, b:b + 1])[:, 0]
        if mask is not None:
            col = col * mask[:, j]
        q_all[:, j] = col
        err = (w[:, j] - col) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q_all


def _problem(seed, out=24, inp=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) / 8 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix
    x[:, 5] *= 15  # an outlier channel
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return x, w, 2 * x.t() @ x / tokens


@pytest.mark.parametrize("symmetric,integer_zero", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("granularity", ["per_block", "per_channel"])
def test_gptq_matches_float64_obs_reference(symmetric, integer_zero, granularity):
    spec = QuantizerSpec(num_bits=4, granularity=granularity, symmetric=symmetric,
                         block_size=16 if granularity == "per_block" else None,
                         integer_zero=integer_zero)
    x, w, h = _problem(0)
    amin, amax = weight_range(w, spec)
    got = gptq_round(w, h, spec, amin, amax, block_size=8, act_order=False)
    ref = _reference(w, h, spec, amin, amax, 0.01)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-9)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("symmetric,integer_zero", [(True, False), (False, False), (False, True)])
def test_gptq_lands_on_the_grid_and_beats_rounding_to_nearest(act_order, symmetric,
                                                              integer_zero):
    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=16, symmetric=symmetric,
                         integer_zero=integer_zero)
    x, w, h = _problem(1)
    w, h = w.float(), h.float()
    amin, amax = weight_range(w, spec)
    amax = amax * 0.9  # searched (clipped) ranges are kept as given
    amin = None if amin is None else amin * 0.9
    got = gptq_round(w, h, spec, amin, amax, act_order=act_order)
    assert torch.equal(qdq_weight(got, spec, amin, amax), got)
    rtn = qdq_weight(w, spec, amin, amax)
    err = lambda q: ((x.float() @ (q - w).t()) ** 2).sum().item()  # noqa: E731
    assert err(got) < 0.7 * err(rtn)


def test_gptq_dead_input_channels_and_shape_errors():
    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=16)
    x, w, h = _problem(2)
    h[:, 7] = 0
    h[7, :] = 0  # an input channel that is always zero
    amin, amax = weight_range(w, spec)
    got = gptq_round(w, h, spec, amin, amax)
    assert torch.isfinite(got).all() and (got[:, 7] == 0).all()
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_round(w, h[:10, :10], spec, amin, amax)


def test_gptq_keeps_pruned_weights_at_zero_and_compensates_them():
    spec = QuantizerSpec(num_bits=8, granularity="per_channel")
    x, w, h = _problem(3)
    mask = torch.zeros_like(w, dtype=torch.bool)  # 2:4: keep the 2 largest of every 4
    idx = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
    mask.reshape(w.shape[0], -1, 4).scatter_(-1, idx, True)
    amin, amax = weight_range(w * mask, spec)
    got = gptq_round(w, h, spec, amin, amax, act_order=False, block_size=8, mask=mask)
    assert (got[~mask] == 0).all()
    assert torch.allclose(got, _reference(w, h, spec, amin, amax, 0.01, mask.double()),
                          atol=1e-9)
    rtn = qdq_weight(w, spec, amin, amax) * mask
    err = lambda q: ((x @ (q - w).t()) ** 2).sum().item()  # noqa: E731
    assert err(got) < 0.9 * err(rtn)  # the kept weights absorb part of the pruning error


def test_gptq_round_leaves_the_callers_hessian_alone():
    """consume=False (the default): the Hessian passed in is not changed, dead columns
    included; consume=True may overwrite it."""
    from modelopt_lite.algorithms.gptq import gptq_round
    from modelopt_lite.config import QuantizerSpec

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0   # a dead input column
    h = x.T @ x / 256
    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=32)
    amax = w.abs().reshape(8, 2, 32).amax(-1)
    before = h.clone()
    gptq_round(w, h, spec, None, amax)
    assert torch.equal(h, before)
    gptq_round(w, h, spec, None, amax, consume=True)
    assert h[5, 5] == 1.0
