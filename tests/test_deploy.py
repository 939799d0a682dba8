"""deploy(): INT4 fake-quant layers become Int4Linear and compute the same function."""

import importlib.util

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.nn import is_quantized
from tiny_models import ALL, random_tokens


@pytest.mark.parametrize("arch,symmetric,integer_zero", [
    ("llama", True, False), ("llama", False, False), ("gemma3", False, False),
    ("opt", True, False), ("gpt2", False, False), ("gpt_neox", True, False),
    ("llama", False, True), ("gpt2", False, True)])
def test_deploy_matches_fake_quant_model(arch, symmetric, integer_zero):
    """Every architecture family, including GPT-2's Conv1D layers (weights stored [in, out]);
    integer zero points come through the packing exactly (the kernels' 4-bit zeros)."""
    from modelopt_lite.kernels.packing import integer_zeros
    from modelopt_lite.nn.int4_linear import Int4Linear

    model = ALL[arch]()
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=32,
                                           symmetric=symmetric, integer_zero=integer_zero))
    mtl.quantize(model, cfg, progress=False)
    n_quant = sum(is_quantized(m) for m in model.modules())
    tokens = random_tokens(n=2, seq=12)
    with torch.no_grad():
        ref = model(tokens).logits
    mtl.deploy(model)
    assert not any(is_quantized(m) for m in model.modules())
    n_int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    assert n_int4 == n_quant
    if arch == "llama":
        assert n_int4 == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    zeros = [integer_zeros(m.packed) for m in model.modules() if isinstance(m, Int4Linear)]
    assert all((z is not None) == integer_zero for z in zeros)
    text = mtl.format_summary(model)
    assert f"{n_quant} layer(s) quantized ({n_quant} deployed), 0 skipped" in text
    assert "(Int4Linear)" in text and "not quantized" not in text
    with torch.no_grad():
        out = model(tokens).logits
    # Int4Linear keeps scales and zero terms in fp16: agreement to fp16 rounding, not bit for
    # bit (Gemma's scaled embeddings read 2.4e-3; a transposed or unmasked weight reads > 5e-2)
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.parametrize("arch,symmetric", [("llama", True), ("gpt2", True), ("llama", False)])
def test_deploy_keeps_2to4_sparsity_exact(arch, symmetric):
    """2:4-sparse + symmetric INT4, or asymmetric with integer zero points: the deployed layers
    hold the pruned weights on the zero level and compute what the fake-quant model does.
    Symmetric: (8 - 8) * s, exactly 0. Integer zero points: u * s + zterm with the zero term
    -z * s rounded to fp16, so within half an fp16 ulp of z * s of 0 (the warp-specialized
    kernel's compact path, (u - z) * s, exactly 0)."""
    from modelopt_lite.nn.int4_linear import Int4Linear
    from modelopt_lite.kernels import dequantize

    model = ALL[arch]()
    mtl.sparsify(model, "2:4", "magnitude")
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32, symmetric=symmetric,
        integer_zero=not symmetric)), progress=False)
    tokens = random_tokens(n=2, seq=12)
    with torch.no_grad():
        ref = model(tokens).logits
    mtl.deploy(model)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers
    for m in layers:
        w = dequantize(m.packed, torch.float32)
        if not symmetric:   # |z s - fp16(z s)| <= 2^-11 * 15 s
            tol = (2.0**-11 * 15 * m.scale.float()).repeat_interleave(m.group_size, 1)
            w = torch.where(w.abs() <= tol[:, :w.shape[1]], 0.0, w)
        zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((zeros >= 2).all())   # at least 2 of every 4 along the input dim
    with torch.no_grad():
        out = model(tokens).logits
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3


def test_deploy_refuses_inexact_sparse_asymmetric_and_changes_nothing():
    """Asymmetric INT4 has fractional zero points: no level is 0, so a 2:4-sparse layer cannot
    be deployed exactly. The error names the layer and the fix; the model is untouched."""
    model = ALL["llama"]()
    mtl.sparsify(model, "2:4", "magnitude")
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32, symmetric=False)), progress=False)
    n_quant = sum(is_quantized(m) for m in model.modules())
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj.*symmetric"):
        mtl.deploy(model)
    assert sum(is_quantized(m) for m in model.modules()) == n_quant


def test_deploy_names_the_layer_and_the_block_rule_and_changes_nothing():
    """A block size the kernels do not read correctly (16: not 32, 64 or a multiple of 128):
    the error names the layer and the rule, and no layer is swapped."""
    model = ALL["llama"]()
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=16)), progress=False)
    n_quant = sum(is_quantized(m) for m in model.modules())
    assert n_quant
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: .*32, 64 "
                                         r"or a multiple of 128, got 16"):
        mtl.deploy(model)
    assert sum(is_quantized(m) for m in model.modules()) == n_quant


def test_deploy_without_int4_layers_warns(caplog):
    model = ALL["llama"]()
    mtl.quantize(model, "int8_weight_only", progress=False)
    with caplog.at_level("WARNING"):
        mtl.deploy(model)
    assert "nothing deployed" in caplog.text


def test_unquantize_after_deploy_is_refused_and_keeps_the_state():
    model = ALL["llama"]()
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32)), progress=False)
    mtl.deploy(model)
    with pytest.raises(ValueError, match=r"deployed as packed INT4 \(first: model\.layers\.0"):
        mtl.unquantize(model)
    assert model._modelopt_lite["deployed"]            # save() still has what it needs


def test_dtype_casts_after_deploy_and_save_load(tmp_path):
    """model.float() keeps the INT4 layers' scales in half precision (and the model runs);
    .to(torch.bfloat16) turns them bf16, and a checkpoint saved then loads bf16 layers."""
    from modelopt_lite.nn.int4_linear import Int4Linear

    def fresh():
        return ALL["llama"]()

    model = fresh()
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32)), progress=False)
    mtl.deploy(model)
    tokens = random_tokens(n=1, seq=8)
    with torch.no_grad():
        ref = model(tokens).logits
        model.float()
        layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
        assert all(m.scale.dtype == torch.float16 for m in layers)
        assert torch.equal(model(tokens).logits, ref)
        model.to(torch.bfloat16)
        assert all(m.scale.dtype == torch.bfloat16 for m in layers)
        mtl.save(model, tmp_path / "ck")
        loaded = mtl.load(fresh(), tmp_path / "ck")
    got = [m for m in loaded.modules() if isinstance(m, Int4Linear)]
    assert len(got) == len(layers) and all(m.scale.dtype == torch.bfloat16 for m in got)


def test_cpu_float32_activations_keep_their_range():
    """On CPU a deployed fp16 layer computes in float32 (the reference), so float32 inputs
    beyond fp16's 65504 stay finite and match the fake-quant model."""
    from torch import nn

    model = nn.Sequential(nn.Linear(256, 64))
    mtl.quantize(model, "int4_weight_only", progress=False)
    x = torch.full((1, 256), 1e5)
    with torch.no_grad():
        ref = model(x)
        out = mtl.deploy(model)(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3   # fp16 scales, as deployed


def test_deploy_an_encoder_decoder_whose_code_reads_the_weight():
    """T5's feed-forward casts its input to ``wo.weight.dtype``: a deployed ``wo`` answers
    with its dequantized float32 weight, and the model computes what the fake-quant one did."""
    from modelopt_lite.calib.runner import decoder_inputs
    from modelopt_lite.nn.int4_linear import Int4Linear
    from tiny_models import tiny_t5

    model = tiny_t5()
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=32))
    mtl.quantize(model, cfg, progress=False)
    ids = random_tokens(n=2, seq=12, seed=4)
    dec = decoder_inputs(model, ids)
    with torch.no_grad():
        ref = model(ids, **dec).logits
        mtl.deploy(model)
        out = model(ids, **dec).logits
    assert isinstance(model.decoder.block[1].layer[2].DenseReluDense.wo, Int4Linear)
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
@pytest.mark.parametrize("arch", ["t5", "llava", "llama"])
def test_deploy_on_gpu_in_half_precision(arch):
    """AWQ INT4 (block 32), moved to the GPU in fp16, then deployed: the Triton kernels compute
    what the fake-quant model did, for an encoder-decoder (T5 reads ``wo.weight``) and a
    multimodal model (its vision tower stays in float) as for a decoder-only one."""
    from modelopt_lite.calib.runner import decoder_inputs
    from modelopt_lite.nn.int4_linear import Int4Linear
    from tiny_models import tiny_llama, tiny_llava, tiny_t5

    model = {"t5": tiny_t5, "llava": tiny_llava, "llama": tiny_llama}[arch]()
    from modelopt_lite.config import get_preset

    mtl.quantize(model, get_preset("int4_awq", block_size=32),
                 calib=random_tokens(n=4, seq=16, seed=3), progress=False)
    model = model.cuda().half()
    ids = random_tokens(n=3, seq=12, seed=4).cuda()
    kw = decoder_inputs(model, ids)
    with torch.no_grad():
        ref = model(ids, **kw).logits.float()
        mtl.deploy(model)
        out = model(ids, **kw).logits.float()
    assert any(isinstance(m, Int4Linear) and m.qweight.is_cuda for m in model.modules())
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def _float64_product(layer, x):
    """What an Int4Linear computes, in float64 from its packed words."""
    from modelopt_lite.kernels import dequantize

    w = dequantize(layer.packed, torch.float64)
    x = x.double() * (1 if layer.pre_scale is None else layer.pre_scale.double())
    return x @ w.T + (0 if layer.bias is None else layer.bias.double())


def _kept_float32_layer(device="cpu"):
    from modelopt_lite.nn.int4_linear import Int4Linear

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8)
    scale = torch.rand(64, 8, generator=g) * 0.1 + 0.01
    layer = Int4Linear.from_codes(codes, scale, None, 32, bias=torch.randn(64, generator=g),
                                  pre_scale=torch.rand(256, generator=g) + 0.5,
                                  keep_float32=True)
    return layer.to(device)


def test_kept_float32_layer_computes_in_float32_and_trains_its_input():
    """keep_float32: the product is float32 on the dequantized words (a float64 reference
    agrees to float32 rounding, far beyond fp16's range), and the input gets its gradient."""
    layer = _kept_float32_layer()
    x = (torch.randn(3, 256, generator=torch.Generator().manual_seed(1)) * 1e4).requires_grad_()
    y = layer(x)
    ref = _float64_product(layer, x.detach())
    assert y.dtype == torch.float32 and y.abs().max() > 1e5
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    y.sum().backward()
    from modelopt_lite.kernels import dequantize
    w = dequantize(layer.packed, torch.float64) * layer.pre_scale.double()
    assert torch.allclose(x.grad.double(), w.sum(0).expand(3, -1), rtol=1e-5)
    assert "keep_float32=True" in repr(layer) and layer.spec()["keep_float32"] is True


def test_deploy_keeps_a_float32_layer_of_a_half_model_in_float32(tmp_path):
    """A model in half precision whose ``wo`` stayed float32 (what Hugging Face's
    ``_keep_in_fp32_modules`` does to T5 loaded in fp16): deploy() keeps exactly those layers'
    products in float32, the model computes what the fake-quant one did, and a checkpoint
    brings the flag back."""
    from modelopt_lite.calib.runner import decoder_inputs
    from modelopt_lite.nn.int4_linear import Int4Linear
    from modelopt_lite.summary import summary_rows
    from tiny_models import tiny_t5

    def fresh():
        model = tiny_t5().to(torch.bfloat16)
        for name, module in model.named_modules():
            if name.endswith(".wo"):
                module.float()
        return model

    model = fresh()
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32)), progress=False)
    ids = random_tokens(n=2, seq=12, seed=4)
    dec = decoder_inputs(model, ids)
    with torch.no_grad():
        ref = model(ids, **dec).logits.float()
        mtl.deploy(model)
        out = model(ids, **dec).logits.float()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    kept = sorted(n for n, m in layers.items() if m.keep_float32)
    assert kept and kept == sorted(n for n in layers if n.endswith(".wo"))
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2   # bf16 activations elsewhere
    rows = {r["name"]: r["reason"] for r in summary_rows(model)}
    assert all(("float32 product" in rows[n]) == m.keep_float32 for n, m in layers.items())
    mtl.save(model, tmp_path / "ck")
    loaded = mtl.load(fresh(), tmp_path / "ck")
    again = {n: m.keep_float32 for n, m in loaded.named_modules() if isinstance(m, Int4Linear)}
    assert again == {n: m.keep_float32 for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids, **dec).logits.float(), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_kept_float32_layer_keeps_its_range_on_gpu():
    """On the GPU the half-precision kernel overflows where the layer's outputs pass fp16's
    range; the same words kept in float32 compute the float64 reference's values."""
    layer = _kept_float32_layer("cuda")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).cuda() * 1e4
    ref = _float64_product(layer, x)
    with torch.no_grad():
        y = layer(x)
        layer.keep_float32 = False
        assert not torch.isfinite(layer(x)).all()   # the hazard the flag avoids
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
