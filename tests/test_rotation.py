"""Online block-Hadamard input rotation (SmoothQuantConfig.rotate): exact in float, spreads
per-token outliers, and survives export, unquantize and save/load."""

import copy

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.algorithms.smoothquant import (DEFAULT_ROTATE, SmoothQuantConfig,
                                                  smoothing_scales)
from modelopt_lite.calib.runner import make_forward_loop
from modelopt_lite.config import ConfigError, QuantizerSpec, parse_overrides
from modelopt_lite.layers import quant_modules
from modelopt_lite.models import UnsupportedModelError, find_decoder_layers, rotate_linear_input_
from modelopt_lite.nn import TensorQuantizer
from modelopt_lite.nn.functional import hadamard, rotate_blocks
from tiny_models import random_tokens, tiny_gemma3, tiny_llama

GRID = (0.0, 0.5, 1.0)


def sq(rotate=DEFAULT_ROTATE, block=32, alpha=None, gptq=False):
    return mtl.get_preset("int8_smoothquant").replace(algorithm=SmoothQuantConfig(
        alpha=alpha, alpha_grid=GRID, refine=0, gptq=gptq, rotate=rotate, rotate_block=block))


def quantized(model, cfg, tokens):
    return mtl.quantize(copy.deepcopy(model), cfg, progress=False,
                        forward_loop=make_forward_loop(tokens, 1, progress=False))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.double()


def rel_err(out, ref):
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def disable_quantizers(model):
    for _, m in quant_modules(model):
        m.weight_quantizer.enabled = m.input_quantizer.enabled = False
    return model


def test_hadamard_is_orthonormal_and_blocks_match_a_block_diagonal_product():
    for n in (1, 2, 16, 128):
        h = hadamard(n, torch.float64)
        assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(h, h.t()) and torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))
    r = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]  # any orthogonal block
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    assert torch.allclose(rotate_blocks(x, r), x @ torch.block_diag(*[r] * 4), atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(24)
    with pytest.raises(ValueError, match="blocks of 8"):
        rotate_blocks(torch.randn(2, 12), r)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_rotation_and_smoothing_leave_the_float_model_unchanged(make):
    """By default down_proj and o_proj are rotated, then smoothed by an explicit multiply
    (no fold through the rotation); the float function stays."""
    model = make(seed=1)
    tokens = random_tokens(4, 32, seed=3)
    q = quantized(model, sq(), tokens)
    rotated = {n.rsplit(".", 1)[-1]: m.input_quantizer for n, m in quant_modules(q)
               if m.input_quantizer.rotation is not None}
    assert sorted(rotated) == ["down_proj", "o_proj"]
    assert all(iq.rotation.shape == (32, 32) and iq.pre_quant_scale is not None
               for iq in rotated.values())
    report = q._smoothquant_report
    keys = {k.split(".", 3)[-1] for k, v in report.items() if v.get("rotation") == 32}
    assert keys == {"mlp.down_proj", "self_attn.o_proj"}
    assert not any(k.endswith(("up_proj", "v_proj")) for k in report)  # no fold through it
    assert rel_err(logits(disable_quantizers(q), tokens), logits(model, tokens)) < 1e-10


def test_rotation_spreads_per_token_outliers_that_smoothing_cannot_follow():
    """One large channel per token, a different one each time (as in a gated MLP's product):
    no per-channel smoothing scale fits every token, a block rotation spreads each spike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g, dtype=torch.float64)
    x[torch.arange(512), torch.randint(0, 128, (512,), generator=g)] *= 40.0
    w = torch.randn(48, 128, generator=g, dtype=torch.float64)
    ref = x @ w.t()

    def act_q(t, rotation=None):  # the library's static per-tensor INT8 input quantizer
        q = TensorQuantizer(QuantizerSpec(num_bits=8, granularity="per_tensor"), "x")
        q.set_rotation(rotation)
        q.set_range(q.rotate(t.float()).abs().amax())
        return q(t.float()).double()

    def w_q(t):  # INT8 per output channel
        s = t.abs().amax(1, keepdim=True) / 127
        return torch.clamp(torch.round(t / s), -128, 127) * s

    def err(y):
        return ((y - ref).norm() / ref.norm()).item()

    plain = err(act_q(x) @ w_q(w).t())
    smoothed = min(err(act_q(x / s) @ w_q(w * s).t()) for s in (
        smoothing_scales(x.abs().amax(0), w.abs().amax(0), a).double() for a in GRID))
    r = hadamard(32, torch.float64)
    rotated = err(act_q(x, r) @ w_q(rotate_blocks(w, r)).t())
    assert torch.allclose(act_q(x, r), act_q(rotate_blocks(x, r)), atol=1e-5)
    assert rotated < 0.5 * min(plain, smoothed), (rotated, plain, smoothed)


def test_rotated_model_exports_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    from modelopt_lite.export.onnx import export_onnx
    from modelopt_lite.export.trt_check import trt_check
    from modelopt_lite.export.verify import compare_with_torch

    tokens = random_tokens(2, 16, seed=5)
    q = quantized(tiny_llama(seed=3, kv_heads=2), sq(), tokens)
    result = export_onnx(q, tokens, tmp_path / "rot.onnx")
    assert compare_with_torch(q, random_tokens(3, 21, seed=6), result.path)["rel"] < 1e-5
    graph = onnx.load(str(result.path)).graph
    rotations = [i for n in graph.node if n.op_type == "MatMul" for i in n.input
                 if i.endswith("input_rotation")]
    assert len(rotations) == 4  # down_proj and o_proj x 2 layers
    assert sum(i.endswith("input_pre_scale") for n in graph.node if n.op_type == "Mul"
               for i in n.input) == 4  # each followed by its explicit smoothing Mul
    assert trt_check(result.path) == []


def test_unquantize_folds_the_rotation_and_save_load_keeps_it(tmp_path):
    model = tiny_llama(seed=4)
    tokens = random_tokens(4, 16, seed=7)
    q = quantized(model, sq(gptq=True), tokens)
    mtl.save(q, tmp_path / "ckpt")
    fresh = mtl.load(tiny_llama(seed=4), tmp_path / "ckpt")
    assert torch.equal(logits(fresh, tokens), logits(q, tokens))
    float_fn = logits(disable_quantizers(copy.deepcopy(q)), tokens)
    plain = mtl.unquantize(q)
    assert not quant_modules(plain)
    assert rel_err(logits(plain, tokens), float_fn) < 1e-10


def test_rotation_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="power of two"):
        SmoothQuantConfig(rotate=("down_proj",), rotate_block=96)
    with pytest.raises(ConfigError, match="tuple of name patterns"):
        SmoothQuantConfig(rotate="down_proj")
    assert parse_overrides(SmoothQuantConfig, ["rotate=down_proj,o_proj"]) == {
        "rotate": ("down_proj", "o_proj")}
    q = quantized(tiny_llama(seed=5), "w8a8", random_tokens(2, 8))
    down = find_decoder_layers(q)[1][0].mlp.down_proj
    down.register_buffer("weight_mask", torch.ones_like(down.weight))
    with pytest.raises(UnsupportedModelError, match="2:4"):
        rotate_linear_input_(down, hadamard(32))
    int4 = mtl.quantize(tiny_llama(seed=5), "int4_weight_only", progress=False)
    find_decoder_layers(int4)[1][0].mlp.down_proj.input_quantizer.rotation = hadamard(32)
    with pytest.raises(ValueError, match="Int4Linear has no online input rotation"):
        mtl.deploy(int4)
