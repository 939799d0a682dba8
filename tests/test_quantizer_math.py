"""Quantizer math against a float64 reference: per-tensor / per-channel / per-block, sym/asym,
int8/int4, dtypes, and the straight-through gradient."""

import pytest
import torch

from modelopt_lite.config import QuantizerSpec
from modelopt_lite.nn import functional as F
from modelopt_lite.nn.tensor_quantizer import TensorQuantizer


def reference_fake_quant(w, bits, symmetric, group, integer_zero=False):
    """Independent float64 reference: loop over groups of a 2-D weight."""
    w = w.double()
    out = torch.empty_like(w)
    rows, k = w.shape
    for r in range(rows):
        for start in range(0, k, group):
            g = w[r, start:start + group]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1  # the negative extreme may use -qmax - 1
                s = max(g.max().item(), -g.min().item() * qmax / (qmax + 1), 1e-8) / qmax
                q = torch.clamp(torch.round(g / s), -qmax - 1, qmax)
                out[r, start:start + group] = q * s
            else:
                lo, hi = g.min().item(), g.max().item()
                s = max(hi - lo, 1e-8) / (2**bits - 1)
                z = -lo / s
                if integer_zero:
                    z = min(max(round(z), 0), 2**bits - 1)
                q = torch.clamp(torch.round(g / s + z), 0, 2**bits - 1)
                out[r, start:start + group] = (q - z) * s
    return out


def _spec(bits, symmetric, gran, block=None, integer_zero=False):
    return QuantizerSpec(num_bits=bits, symmetric=symmetric, granularity=gran, block_size=block,
                         integer_zero=integer_zero)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric,integer_zero", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("gran,block", [("per_tensor", None), ("per_channel", None),
                                        ("per_block", 16), ("per_block", 32)])
def test_weight_fake_quant_matches_float64_reference(bits, symmetric, integer_zero, gran, block):
    w = torch.randn(6, 64) * torch.rand(6, 1) * 3
    q = TensorQuantizer(_spec(bits, symmetric, gran, block, integer_zero), "w", is_weight=True)
    q.init_from_weight(w)
    got = q(w).double()
    group = {"per_tensor": None, "per_channel": 64}.get(gran, block)
    if gran == "per_tensor":
        ref = reference_fake_quant(w.reshape(1, -1), bits, symmetric, w.numel(),
                                   integer_zero).reshape(w.shape)
    else:
        ref = reference_fake_quant(w, bits, symmetric, group, integer_zero)
    # float32 arithmetic may round a value sitting on a .5 boundary the other way: one step
    step = (w.abs().max() / (2 ** (bits - 1) - 1)).item() * 2
    assert ((got - ref).abs() > 1e-5).float().mean() < 0.01
    assert (got - ref).abs().max() <= step
    sqnr = 10 * torch.log10(w.double().pow(2).sum() / (got - w.double()).pow(2).sum())
    # worst case over 300 draws is ~2.5 dB above these floors (per-tensor 4-bit: 11.6 dB)
    floor = {(4, True): 9, (4, False): 14, (8, True): 32, (8, False): 38}
    assert sqnr > floor[(bits, gran == "per_tensor")]


def test_asymmetric_reproduces_min_max_grid_exactly():
    # weights already on an asymmetric 4-bit grid per block of 32 (like GGUF Q4_1) come back bit for bit
    scale = torch.rand(4, 2, 1) + 0.1
    low = torch.randn(4, 2, 1)
    codes = torch.randint(0, 16, (4, 2, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * scale + low).reshape(4, 64)
    q, s, z = F.quantize_blockwise(w, 32, 4, symmetric=False)
    assert torch.allclose(F.dequantize_blockwise(q, s, z, 32), w, atol=1e-5)


def test_integer_zero_points_keep_zero_exact_and_pass_range_gradients():
    """integer_zero: each block's zero point is an integer code, so 0 comes back exactly; the
    rounding passes the range's gradient straight through (QAT with learned ranges)."""
    w = torch.randn(4, 64) + 0.3
    w[:, ::5] = 0.0
    q, s, z = F.quantize_blockwise(w, 32, 4, symmetric=False, integer_zero=True)
    assert torch.equal(z, z.round()) and bool(((z >= 0) & (z <= 15)).all())
    assert bool((F.dequantize_blockwise(q, s, z, 32)[:, ::5] == 0).all())
    _, _, zf = F.quantize_blockwise(w, 32, 4, symmetric=False)
    assert not torch.equal(zf, zf.round())          # the default keeps float zero points
    amin = torch.full((3,), -0.37, requires_grad=True)
    scale, zero = F.scale_zero(amin, torch.full((3,), 1.1), 4, False, integer_zero=True)
    zero.sum().backward()
    expect = -1 / scale.detach() + 0.37 * 15 / 1.47**2   # d(-amin / scale) / d amin
    assert torch.allclose(amin.grad, expect, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_keeps_dtype_and_is_close(dtype):
    w = torch.randn(8, 64).to(dtype)
    q = TensorQuantizer(_spec(8, True, "per_channel"), "w", is_weight=True)
    out = q(w)
    assert out.dtype == dtype
    ref = reference_fake_quant(w.float(), 8, True, 64)
    amax = w.float().abs().amax(1, keepdim=True).double()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * amax
    err = (out.double() - ref).abs()
    # rounding the output to the dtype costs `tol`; a value on a .5 boundary may also land
    # one step (amax / 127) the other way
    assert (err <= tol + 1e-6).double().mean() > 0.97
    assert (err <= tol + amax / 127 + 1e-6).all()


def test_ste_gradient_is_identity_and_clipped_ste_zeroes_outside():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    q = TensorQuantizer(_spec(8, True, "per_tensor"), "act")
    q.set_range(torch.tensor(1.0))
    g = torch.randn(41)
    q(x).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    q.clip_grad = True
    q(x).backward(g)
    inside = (x.detach().abs() <= 1.0 + 0.5 / 127).float()
    assert torch.equal(x.grad, g * inside)
    assert inside.sum() < 41  # the test can fail: some inputs are outside


def test_dynamic_per_token_uses_each_rows_range():
    x = torch.randn(3, 5, 32) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    q = TensorQuantizer(QuantizerSpec(num_bits=8, granularity="per_token", dynamic=True), "a")
    out = q(x)
    rel = (out - x).abs().amax(-1) / x.abs().amax(-1)
    assert rel.max() < 1 / 127


def test_calibration_collects_absmax_and_rejects_nan():
    from modelopt_lite.nn import CalibrationError

    q = TensorQuantizer(_spec(8, True, "per_tensor"), "layer.input")
    q.start_calibration()
    q(torch.tensor([1.0, -3.0]))
    q(torch.tensor([2.0]))
    q.finish_calibration()
    assert q.amax.item() == 3.0
    q.start_calibration()
    with pytest.raises(CalibrationError, match="layer.input.*NaN"):
        q(torch.tensor([float("nan")]))


def test_int4_codes_round_trip():
    w = torch.randn(16, 128)
    for symmetric in (True, False):
        q = TensorQuantizer(_spec(4, symmetric, "per_block", 64), "w", is_weight=True)
        q.init_from_weight(w)
        codes, scale, zero, block = q.int4_codes(w)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
        z = 8.0 if zero is None else zero.unsqueeze(-1)
        deq = ((codes.float().reshape(16, 2, 64) - z) * scale.unsqueeze(-1)).reshape(16, 128)
        assert torch.allclose(deq, q(w), atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weight_range_uses_the_negative_level_without_clipping(bits):
    """Both extremes land on the grid (no clipping: error <= scale / 2 everywhere), the step is
    never coarser than abs-max / qmax, and it is finer when the negative extreme dominates."""
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(64, 128, dtype=torch.float64)
    w[:32, 0] = -w[:32].abs().amax(1) * 1.5     # rows 0..31: the negative extreme dominates
    amax = F.symmetric_amax(w, 1, bits, keepdim=True)
    scale = amax / qmax
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
    assert ((q * scale - w).abs() <= scale / 2 + 1e-12).all()
    old = w.abs().amax(1, keepdim=True) / qmax
    assert (scale <= old + 1e-12).all()
    torch.testing.assert_close(scale[:32], old[:32] * qmax / (qmax + 1))
    assert (q[:32, 0] == -qmax - 1).all()
