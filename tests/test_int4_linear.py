import importlib.util

import pytest
import torch
from torch import nn

from modelopt_lite.kernels.packing import quantize_rtn
from modelopt_lite.nn.int4_linear import Int4Linear, deploy_int4


class _StandInQuantizer(nn.Module):
    """The fake-quant interface deploy_int4 relies on: absmax (sym) or min/max block RTN."""

    def __init__(self, block, symmetric):
        super().__init__()
        self.block, self.symmetric = block, symmetric

    @property
    def is_int4_block(self):
        return True

    def int4_codes(self, w):
        codes, scale, zero = quantize_rtn(w, self.block, self.symmetric)
        return codes, scale, zero, self.block

    def forward(self, w):
        codes, scale, zero, b = self.int4_codes(w)
        z = torch.full_like(scale, 8.0) if zero is None else zero
        return ((codes.float() - z.repeat_interleave(b, 1)) * scale.repeat_interleave(b, 1)).to(w.dtype)


class _InputQuantizer(nn.Module):
    def __init__(self, pre_quant_scale):
        super().__init__()
        self.register_buffer("pre_quant_scale", pre_quant_scale)


class _FakeQuantLinear(nn.Linear):
    def __init__(self, k, n, block, symmetric, pre_scale=None, bias=True):
        super().__init__(k, n, bias=bias)
        self.weight_quantizer = _StandInQuantizer(block, symmetric)
        self.input_quantizer = _InputQuantizer(pre_scale)

    def forward(self, x):
        ps = self.input_quantizer.pre_quant_scale
        x = x * ps if ps is not None else x
        return nn.functional.linear(x, self.weight_quantizer(self.weight), self.bias)


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_codes_matches_dequantized_linear(symmetric, dtype):
    n, k, g = 24, 128, 32
    w = torch.randn(n, k)
    codes, scale, zero = quantize_rtn(w, g, symmetric)
    bias, pre = torch.randn(n), torch.rand(k) + 0.5
    mod = Int4Linear.from_codes(codes, scale, zero, g, bias=bias, dtype=dtype, pre_scale=pre)
    z = torch.full_like(scale, 8.0) if zero is None else zero
    w_hat = (codes.float() - z.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
    x = torch.randn(3, 5, k)
    y = mod(x)
    assert y.shape == (3, 5, n) and y.dtype == x.dtype
    assert _rel_err(y, (x * pre) @ w_hat.t() + bias) < 1e-2
    assert "symmetric=" + str(symmetric) in repr(mod)


def test_from_codes_bad_block_explains():
    with pytest.raises(ValueError, match="block size"):
        Int4Linear.from_codes(torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 1), None, 64)


@pytest.mark.parametrize("g", [8, 16, 48, 96, 0])
def test_block_sizes_the_kernels_misread_are_refused(g):
    """The kernels read blocks of 32, 64 or multiples of 128 (a 128-wide chunk of K holds whole
    blocks or lies inside one); 16 or 48 would give wrong products on the GPU."""
    from modelopt_lite.kernels import pack_weight

    k = 384
    with pytest.raises(ValueError, match=rf"32, 64 or a multiple of 128, got {g}"):
        Int4Linear(k, 8, group_size=g)
    with pytest.raises(ValueError, match=rf"32, 64 or a multiple of 128, got {g}"):
        pack_weight(torch.zeros(8, k, dtype=torch.uint8), torch.ones(8, 1), None, g)


def test_bad_inputs_to_the_layer_and_the_matmul():
    from modelopt_lite.kernels import w4a16_matmul

    codes, scale, zero = quantize_rtn(torch.randn(16, 128), 32, False)
    mod = Int4Linear.from_codes(codes, scale, zero, 32, bias=torch.randn(16))
    with pytest.raises(TypeError, match="floating-point activations, got torch.int8"):
        mod(torch.ones(2, 128, dtype=torch.int8))
    x = torch.randn(2, 128, dtype=torch.float16)
    for bad in (torch.randn(1, dtype=torch.float16), torch.randn(8, dtype=torch.float16)):
        with pytest.raises(ValueError, match=r"bias must be \[16\]"):
            w4a16_matmul(x, mod.packed, bad)
    skewed = mod.packed._replace(scale=mod.packed.scale.t().contiguous().t())
    with pytest.raises(ValueError, match="must be contiguous"):
        w4a16_matmul(x, skewed)
    with pytest.raises(ValueError, match="has no BN"):
        w4a16_matmul(x, mod.packed, None, {"BM": 16})


def test_state_dict_roundtrip():
    w = torch.randn(16, 64)
    mod = Int4Linear.from_codes(*quantize_rtn(w, 32), 32, bias=torch.randn(16))
    fresh = Int4Linear(64, 16, 32, bias=True)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), mod(x))


def test_words_tiled_by_default_and_old_state_dicts_convert(caplog):
    """Deployed layers hold their words tile by tile (row blocks of 256, N = 600: two whole
    blocks and a partial one); the state dict records the layout, and a state dict without it
    (row by row, as saved before) or with another layout is converted on load."""
    from modelopt_lite.kernels.packing import pack_weight, tile_words

    w = torch.randn(600, 256)
    q = quantize_rtn(w, 128)
    mod = Int4Linear.from_codes(*q, 128, bias=torch.randn(600))
    rows = pack_weight(*q, 128).qweight
    assert mod.tile_rows == 256 and mod.packed.tile_rows == 256 and mod.spec()["tile_rows"] == 256
    assert torch.equal(mod.qweight, tile_words(rows, 256))
    x = torch.randn(3, 256)
    y = mod(x)
    flat = Int4Linear.from_codes(*q, 128, bias=mod.bias, tile_rows=0)
    assert torch.equal(flat.qweight, rows) and torch.equal(flat(x), y)

    sd = mod.state_dict()
    assert sd["_extra_state"].tolist() == [256, 2]   # tile rows, layout version
    old = {k: v for k, v in sd.items() if k != "_extra_state"}
    old["qweight"] = rows.clone()               # a state dict from before the layout was saved
    fresh = Int4Linear(256, 600, 128)
    with caplog.at_level("WARNING"):
        fresh.load_state_dict(old)
    assert "taken as row by row" in caplog.text
    assert torch.equal(fresh.qweight, mod.qweight) and torch.equal(fresh(x), y)
    into_rows = Int4Linear(256, 600, 128, tile_rows=0)
    into_rows.load_state_dict(sd)               # tiled -> row by row
    assert torch.equal(into_rows.qweight, rows) and torch.equal(into_rows(x), y)
    into_128 = Int4Linear(256, 600, 128, tile_rows=128)
    into_128.load_state_dict(into_rows.state_dict())
    assert torch.equal(into_128.qweight, tile_words(rows, 128)) and torch.equal(into_128(x), y)
    # version 1 (tile rows alone): tiled words whose pairs were not byte-swapped yet
    v1 = dict(sd, _extra_state=torch.tensor([256], dtype=torch.int32))
    v1["qweight"] = _tiled_unswapped(rows, 256)
    into_v1 = Int4Linear(256, 600, 128, tile_rows=128)
    into_v1.load_state_dict(v1)
    assert torch.equal(into_v1.qweight, tile_words(rows, 128)) and torch.equal(into_v1(x), y)
    with pytest.raises(ValueError, match="multiple of 128"):
        Int4Linear(256, 600, 128, tile_rows=64)


def _tiled_unswapped(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Row-by-row words tiled as layout version 1 did: row blocks of r, chunk by chunk, each
    row's 16 words as they are (built here by index, independently of packing.tile_words)."""
    n, kw = rows.shape
    out = torch.empty(n * kw, dtype=rows.dtype)
    for r0 in range(0, n, r):
        nb = min(r, n - r0)
        for c in range(kw // 16):
            for i in range(nb):
                start = r0 * kw + 16 * (c * nb + i)
                out[start:start + 16] = rows[r0 + i, 16 * c:16 * c + 16]
    return out.view(n, kw)


def _model(pre_scale):
    torch.manual_seed(0)
    return nn.Sequential(
        _FakeQuantLinear(64, 96, 32, symmetric=False, pre_scale=pre_scale), nn.ReLU(),
        _FakeQuantLinear(96, 32, 32, symmetric=True, bias=False), nn.ReLU(),
        nn.Linear(32, 8))


@pytest.mark.parametrize("pre_scale", [None, torch.rand(64) + 0.5])
def test_deploy_int4_swaps_fake_quant_layers_and_keeps_outputs(pre_scale):
    model = _model(pre_scale)
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
        deployed = deploy_int4(model)
        after = deployed(x)
    assert isinstance(deployed[0], Int4Linear) and isinstance(deployed[2], Int4Linear)
    assert isinstance(deployed[4], nn.Linear) and not isinstance(deployed[4], Int4Linear)
    assert deployed[0].zterm is not None and deployed[2].zterm is None
    assert deployed[2].bias is None
    assert _rel_err(after, before) < 5e-3
    with torch.no_grad():
        inputs = {0: x, 2: torch.relu(deployed[0](x))}
    for i, xin in inputs.items():   # the effective weight, for code that reads it
        layer, x = deployed[i], xin
        w = layer.weight
        assert w.dtype == torch.float32 and w.shape == (layer.out_features, layer.in_features)
        assert "weight" not in layer.state_dict()
        with pytest.raises(RuntimeError, match="[Ii]nplace"):   # cannot reach the packed words
            layer.weight.mul_(2)
        with torch.no_grad():
            bias = None if layer.bias is None else layer.bias.float()
            torch.testing.assert_close(nn.functional.linear(x, w, bias), layer(x),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_deploy_int4_on_gpu_runs_the_kernel():
    model = _model(torch.rand(64) + 0.5).cuda().half()
    x = torch.randn(5, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        before = model(x)
        after = deploy_int4(model)(x)
    assert _rel_err(after, before) < 1e-2


def test_compile_traces_int4_linear_as_one_operator():
    """torch.compile(fullgraph=True) goes through a deployed model: each Int4Linear is one
    modelopt_lite::w4a16_linear node, and the compiled outputs are the eager ones."""
    model = deploy_int4(_model(torch.rand(64) + 0.5))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm

    x = torch.randn(4, 64)
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
        eager = model(x)
    assert seen.count(torch.ops.modelopt_lite.w4a16_linear.default) == 2
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_linear_operator_checks(symmetric):
    """The operator's schema, fake (meta) implementation and dynamic-shape tracing
    (torch.library.opcheck)."""
    mod = Int4Linear.from_codes(*quantize_rtn(torch.randn(300, 256), 32, symmetric), 32,
                                bias=torch.randn(300))   # two chunks: tiling moves words
    x = torch.randn(2, 3, 256).half()
    args = (x, mod.qweight, mod.scale, mod.zterm, mod.bias, 32, 256, mod.tile_rows)
    torch.library.opcheck(torch.ops.modelopt_lite.w4a16_linear.default, args)
    assert torch.equal(torch.ops.modelopt_lite.w4a16_linear(*args), mod(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_compiled_int4_model_on_gpu_with_cuda_graphs():
    """mode="reduce-overhead" (Inductor + CUDA graphs) around the Triton kernels: replays on
    fresh inputs give the eager outputs."""
    model = deploy_int4(_model(torch.rand(64) + 0.5).cuda().half())
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(5, 64, device="cuda", dtype=torch.half)
            assert _rel_err(compiled(x).clone(), model(x)) < 1e-3


def test_export_keeps_plain_operators():
    """torch.export (the ONNX exporter's tracer) sees the reference's plain operators, not
    the opaque operator that torch.compile gets."""
    mod = Int4Linear.from_codes(*quantize_rtn(torch.randn(16, 64), 32), 32, bias=torch.randn(16))
    x = torch.randn(2, 64)
    ep = torch.export.export(mod, (x,))
    assert not any("w4a16_linear" in str(node.target) for node in ep.graph.nodes)
    assert _rel_err(ep.module()(x), mod(x)) < 1e-6


@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_reach_the_input(compiled, monkeypatch):
    """An INT4 base layer under a trainable input (adapters before it, say): the input and
    bias get the gradients of (x * pre_scale) @ W_hat^T + b, eagerly and under
    torch.compile; the packed weight stays frozen. The product is made graph-less here, as
    the GPU kernels' is."""
    from modelopt_lite.kernels import w4a16_reference
    from modelopt_lite.nn import int4_linear

    monkeypatch.setattr(int4_linear, "_matmul",
                        lambda x, p, bias: w4a16_reference(x, p, bias).detach())
    torch.manual_seed(0)
    n, k, g = 24, 128, 32
    codes, scale, zero = quantize_rtn(torch.randn(n, k), g, False)
    pre = torch.rand(k) + 0.5
    mod = Int4Linear.from_codes(codes, scale, zero, g, bias=torch.randn(n), pre_scale=pre)
    mod.bias.requires_grad_(True)
    w_hat = (codes.double() - zero.double().repeat_interleave(g, 1)) * \
        mod.scale.double().repeat_interleave(g, 1)
    x = torch.randn(3, 5, k, requires_grad=True)
    gy = torch.randn(3, 5, n)
    fn = torch.compile(mod, backend="aot_eager", fullgraph=True) if compiled else mod
    (fn(x) * gy).sum().backward()
    assert _rel_err(x.grad, (gy.double() @ w_hat) * pre.half().double()) < 2e-3
    assert _rel_err(mod.bias.grad, gy.double().sum((0, 1))) < 1e-3
    assert mod.qweight.grad is None and not mod.scale.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_gradients_through_the_kernel_on_gpu():
    """On CUDA the product is the Triton kernel; the input still gets grad @ W_hat."""
    n, k, g = 256, 512, 128
    codes, scale, zero = quantize_rtn(torch.randn(n, k), g, False)
    mod = Int4Linear.from_codes(codes, scale, zero, g, bias=torch.randn(n)).cuda()
    w_hat = ((codes.double() - zero.double().repeat_interleave(g, 1))
             * mod.scale.double().cpu().repeat_interleave(g, 1)).cuda()
    x = torch.randn(7, k, device="cuda", dtype=torch.half, requires_grad=True)
    gy = torch.randn(7, n, device="cuda", dtype=torch.half)
    (mod(x) * gy).sum().backward()
    assert _rel_err(x.grad, gy.double() @ w_hat) < 2e-3
