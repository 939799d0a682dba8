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


@pytest.mark.parametrize("bits,granularity", [(4, "per_block"), (8, "per_channel")])
@pytest.mark.parametrize("symmetric,integer_zero,sparse", [
    (True, False, False), (False, False, False), (False, True, False), (True, False, True)])
def test_gptq_kernel_matches_the_pytorch_column_loop(symmetric, integer_zero, sparse, bits,
                                                     granularity, monkeypatch):
    """The Triton column loop (kernels/gptq.py, here under TRITON_INTERPRET=1) gives the
    PyTorch loop's result bit for bit: the whole gptq_round, float32, act order, odd sizes
    (83 outputs: not a multiple of the 64-wide program; 150 inputs: a 22-column last block),
    zero points and a 2:4 mask."""
    pytest.importorskip("triton")
    import modelopt_lite.algorithms.gptq as G

    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 150, generator=g)
    x[:, 3] *= 12
    w = torch.randn(83, 150, generator=g)
    h = 2 * x.t() @ x / 300
    spec = QuantizerSpec(num_bits=bits, granularity=granularity,
                         block_size=50 if granularity == "per_block" else None,
                         symmetric=symmetric, integer_zero=integer_zero)
    mask = None
    if sparse:
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[:, :148].reshape(83, -1, 4).scatter_(
            -1, w[:, :148].abs().reshape(83, -1, 4).topk(2, dim=-1).indices, True)
    amin, amax = weight_range(w, spec)
    monkeypatch.setattr(G, "_use_kernel", lambda W, block: False)
    loop = gptq_round(w, h, spec, amin, amax, mask=mask)
    monkeypatch.setattr(G, "_use_kernel", lambda W, block: True)
    fused = gptq_round(w, h, spec, amin, amax, mask=mask)
    assert torch.equal(fused, loop)


def test_gptq_kernel_input_checks():
    pytest.importorskip("triton")
    from modelopt_lite.kernels.gptq import gptq_round_block

    w = torch.zeros(129, 8)
    with pytest.raises(ValueError, match="at most 128 columns"):
        gptq_round_block(w, torch.eye(129), w.clone(), torch.ones_like(w), None, -8, 7)
    w = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="row-contiguous"):
        gptq_round_block(w, torch.eye(8).t().contiguous().t()[:, :], w.clone(),
                         torch.ones(8, 8).t(), None, -8, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,granularity", [(4, "per_block"), (8, "per_channel")])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gpu_gptq_kernel_against_the_pytorch_loop(symmetric, bits, granularity, monkeypatch):
    """On the GPU the compiler may fuse a multiply-subtract: nearly every code agrees, and the
    output error the rounding leaves is the loop's to 1e-3."""
    import modelopt_lite.algorithms.gptq as G

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 1024, device="cuda", generator=g)
    w = torch.randn(768, 1024, device="cuda", generator=g)
    h = 2 * x.t() @ x / 2048
    spec = QuantizerSpec(num_bits=bits, granularity=granularity,
                         block_size=128 if granularity == "per_block" else None,
                         symmetric=symmetric)
    amin, amax = weight_range(w, spec)
    monkeypatch.setattr(G, "_use_kernel", lambda W, block: False)
    loop = gptq_round(w, h, spec, amin, amax)
    monkeypatch.undo()
    assert G._use_kernel(w, 128)
    fused = gptq_round(w, h, spec, amin, amax)
    assert torch.equal(qdq_weight(fused, spec, amin, amax), fused)   # on the grid
    assert (fused == loop).float().mean() > 0.999
    err = lambda q: ((x @ (q - w).t()) ** 2).sum().item()  # noqa: E731
    assert abs(err(fused) - err(loop)) < 1e-3 * err(loop)


def test_gptq_refuses_a_weight_with_nan_naming_the_layer():
    """A NaN weight would spread over its whole row (and the GPU kernel's clamp would turn it
    into a finite code): a clear error instead."""
    import modelopt_lite as mtl
    from tiny_models import random_tokens, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: the weight holds NaN"):
        mtl.quantize(model, "int4_awq", calib=random_tokens(2, 32, seed=0), progress=False)
