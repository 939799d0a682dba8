"""nn.MultiheadAttention unpacked into q/k/v/out nn.Linear layers: the same function as torch's
module (float64), quantized through every path (against torch's own module running
independently rounded weights), restored on failure, saved and loaded, exported, sparsified."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.attention import LinearMultiheadAttention, pack_attention, unpack_attention
from modelopt_lite.sparsity import sparsify
from test_quantizer_math import reference_fake_quant

E, H = 32, 4


def _inputs(bf, kdim, vdim, b=3, tgt=5, src=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=g, dtype=torch.float64)
               for n, d in ((tgt, E), (src, kdim or E), (src, vdim or E)))
    return (q, k, v) if bf else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


def _masks(b=3, tgt=5, src=7):
    g = torch.Generator().manual_seed(1)
    kpm = torch.zeros(b, src, dtype=torch.bool)
    kpm[0, -2:] = True
    am2 = torch.randn(tgt, src, generator=g, dtype=torch.float64)
    am3 = torch.rand(b * H, tgt, src, generator=g) > 0.4
    am3[..., 0] = False   # every query keeps one key
    return [{}, dict(key_padding_mask=kpm), dict(attn_mask=am2), dict(attn_mask=am3),
            dict(attn_mask=am2, key_padding_mask=kpm), dict(need_weights=False),
            dict(need_weights=False, attn_mask=am3, key_padding_mask=kpm),
            dict(average_attn_weights=False, key_padding_mask=kpm)]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("bf,dims,bias,add_kv,zero", list(itertools.product(
    [True, False], [(None, None), (24, 20)], [True, False], [False, True], [False, True])))
def test_unpacked_computes_what_torch_computes(bf, dims, bias, add_kv, zero):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_kv, add_zero_attn=zero,
                                kdim=dims[0], vdim=dims[1], batch_first=bf).double().eval()
    ref = copy.deepcopy(mha)
    model = nn.ModuleDict({"attn": mha})
    assert unpack_attention(model) == ["attn"]
    attn = model["attn"]
    assert isinstance(attn, LinearMultiheadAttention)
    plain = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert all(type(getattr(attn, p)) in plain
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    q, k, v = _inputs(bf, *dims)
    for kw in _masks():
        out, w = attn(q, k, v, **kw)
        ref_out, ref_w = ref(q, k, v, **kw)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=str(kw))
        assert (w is None) == (ref_w is None)
        if w is not None:
            torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    one = lambda t: t[0] if bf else t[:, 0]  # noqa: E731 - an unbatched input
    out, w = attn(one(q), one(k), one(v))
    ref_out, ref_w = ref(one(q), one(k), one(v))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)

    loaded = copy.deepcopy(model)   # a packed state dict loads into the unpacked module
    loaded.load_state_dict({f"attn.{k}": t * 2 for k, t in ref.state_dict().items()})
    ref2 = copy.deepcopy(ref)
    ref2.load_state_dict({k: t * 2 for k, t in ref.state_dict().items()})
    torch.testing.assert_close(loaded["attn"](q, k, v)[0], ref2(q, k, v)[0])

    assert pack_attention(model) == ["attn"]
    assert type(model["attn"]) is nn.MultiheadAttention
    assert list(model["attn"].state_dict()) == list(ref.state_dict())
    for key, t in ref.state_dict().items():
        assert torch.equal(model["attn"].state_dict()[key], t), key
    assert [n for n, _ in model["attn"].named_parameters()] == [
        n for n, _ in ref.named_parameters()]


def _unpacked_and_reference(dtype):
    """A batch-first nn.MultiheadAttention unpacked inside ``nn.Sequential``, and a copy of
    it left as torch built it."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).to(dtype)
    ref = copy.deepcopy(mha)
    model = nn.Sequential(mha)
    unpack_attention(model)
    return model, ref


def test_causal_hint_and_gradients_match():
    model, ref = _unpacked_and_reference(torch.float64)
    x = torch.randn(2, 6, E, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for need in (True, False):
        out = model[0](x, x, x, attn_mask=mask, is_causal=True, need_weights=need)[0]
        want = ref(xr, xr, xr, attn_mask=mask, is_causal=True, need_weights=need)[0]
        torch.testing.assert_close(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(model[0].q_proj.weight.grad, ref.in_proj_weight.grad[:E])
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        model[0](x, x, x, is_causal=True)


def encoder(layers=2, d=64, heads=4, norm_first=False, nested=False, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    return nn.Sequential(nn.Linear(16, d), nn.TransformerEncoder(
        layer, layers, enable_nested_tensor=nested), nn.Linear(d, 8)).eval()


def _fq_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, the float64 reference of the quantizer tests."""
    return reference_fake_quant(w, 8, True, w.shape[1]).to(w.dtype)


def test_int8_weights_reach_every_projection_and_match_torch_with_rounded_weights():
    """int8_weight_only on an nn.TransformerEncoder: every projection is quantized (none
    'not called'), and the model computes what torch's own modules compute (fast path off)
    with each weight rounded per row by the independent reference; in_proj_weight's rows are
    q/k/v's rows, so per-row rounding of the packed weight is the reference for all three."""
    model = encoder()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 10, 16)
    mtl.quantize(model, "int8_weight_only", progress=False)
    rows = {r["name"]: r for r in model._modelopt_lite["layers"]}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert not rows[f"1.layers.{i}.self_attn.{p}"]["skipped"]
    with torch.no_grad():
        for name, mod in ref.named_modules():
            for pname in ("weight", "in_proj_weight"):
                w = getattr(mod, pname, None) if "norm" not in name else None
                if isinstance(w, nn.Parameter) and w.dim() == 2:
                    w.copy_(_fq_rows(w))
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            want = ref(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        got = model(x)   # under no_grad, in eval: torch's fused path would skip the quantizers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["w8a8", "int8_smoothquant", "int4_awq"])
def test_presets_quantize_attention_and_save_load(tmp_path, preset):
    model = encoder(d=128)
    with torch.no_grad():
        float_out = model(torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(5))
    calib = [torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    mtl.quantize(model, preset, calib=calib, progress=False)
    names = [r["name"] for r in model._modelopt_lite["layers"] if not r["skipped"]]
    assert "1.layers.1.self_attn.k_proj" in names and "1.layers.0.self_attn.out_proj" in names
    assert model._modelopt_lite["attention_unpacked"]
    with torch.no_grad():
        out = model(x)
    rel = ((out - float_out).norm() / float_out.norm()).item()
    assert 0 < rel < (0.15 if preset == "int4_awq" else 0.05), rel
    mtl.save(model, tmp_path)
    fresh = encoder(d=128)
    assert type(fresh[1].layers[0].self_attn) is nn.MultiheadAttention
    mtl.load(fresh, tmp_path)
    assert isinstance(fresh[1].layers[0].self_attn, LinearMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


def test_failed_quantize_puts_the_original_attention_back():
    """The same module and Parameter objects come back (an optimizer built before still
    updates them), each with its own requires_grad, with the values it had."""
    model = encoder()
    for layer in model[1].layers:
        layer.self_attn.in_proj_bias.requires_grad_(False)
    attns = [layer.self_attn for layer in model[1].layers]
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(m):
        m(torch.randn(2, 10, 16))
        raise RuntimeError("data ran out")

    with pytest.raises(RuntimeError, match="data ran out"):
        mtl.quantize(model, "w8a8", forward_loop=broken, progress=False)
    assert [layer.self_attn for layer in model[1].layers] == attns
    assert type(attns[0]) is nn.MultiheadAttention
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert not attns[0].in_proj_bias.requires_grad and attns[0].in_proj_weight.requires_grad
    assert model[1].use_nested_tensor is False   # as built (enable_nested_tensor=False)
    assert not hasattr(model, "_modelopt_lite")


def test_shared_module_hooks_and_a_bare_attention():
    """A module used twice is replaced in both places by one unpacked module; hooks on it keep
    firing; a model that is itself an nn.MultiheadAttention keeps its out_proj path."""
    shared = nn.MultiheadAttention(E, H, batch_first=True)
    calls = []
    shared.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = shared, shared

        def forward(self, x):
            return self.b(self.a(x, x, x)[0], x, x)[0]

    model, x = Twice().eval(), torch.randn(2, 5, E)
    with torch.no_grad():
        ref = model(x)
    mtl.quantize(model, "int8_weight_only", progress=False)
    assert model.a is model.b and isinstance(model.a, LinearMultiheadAttention)
    calls.clear()
    with torch.no_grad():
        rel = ((model(x) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02 and len(calls) == 2
    mtl.unquantize(model)
    pack_attention(model)
    assert model.a is shared and model.b is shared

    bare = nn.MultiheadAttention(E, H)
    mtl.quantize(bare, "int8_weight_only", progress=False)
    assert type(bare) is nn.MultiheadAttention and hasattr(bare.out_proj, "weight_quantizer")


def test_half_precision_weights_match_torch_bit_for_bit():
    model, ref = _unpacked_and_reference(torch.float16)
    x, mask = torch.randn(2, 5, E).half(), torch.randn(5, 5).half()
    out, w = model[0](x, x, x, attn_mask=mask)
    want, want_w = ref(x, x, x, attn_mask=mask)
    assert torch.equal(out, want) and torch.equal(w, want_w)


def test_nested_tensor_fast_path_is_turned_off_and_restored():
    """An encoder built with nested tensors would convert padded batches to NestedTensor and
    read the packed weights; after quantize() it runs the quantized layers instead."""
    model = encoder(nested=True)
    assert model[1].use_nested_tensor
    x = torch.randn(3, 10, 16)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    mtl.quantize(model, "w8a8", calib=[x], progress=False)
    assert model[1].use_nested_tensor is False

    def run(m):
        h = m[0](x)
        return m[2](m[1](h, src_key_padding_mask=pad))

    with torch.no_grad():
        got = run(model)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = run(model)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got[~pad], want[~pad])
    mtl.unquantize(model)
    pack_attention(model)
    assert model[1].use_nested_tensor
    assert type(model[1].layers[1].self_attn) is nn.MultiheadAttention


def test_decoder_cross_attention_is_quantized():
    torch.manual_seed(0)
    model = nn.Transformer(64, 4, num_encoder_layers=1, num_decoder_layers=2,
                           dim_feedforward=128, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(2, 9, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        ref = model(src, tgt)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(src, tgt), progress=False)
    skipped = [r["name"] for r in model._modelopt_lite["layers"] if r["skipped"]]
    assert skipped == []
    assert "decoder.layers.1.multihead_attn.k_proj" in {
        r["name"] for r in model._modelopt_lite["layers"]}
    with torch.no_grad():
        rel = ((model(src, tgt) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05


def test_sparsify_reaches_attention_projections_and_pack_keeps_the_zeros(tmp_path):
    model = encoder()
    sparsify(model, "2:4", "magnitude")
    w = model[1].layers[0].self_attn.v_proj.weight
    assert (w.view(-1, 4) != 0).sum(-1).max() <= 2
    assert model._modelopt_lite["attention_unpacked"]
    pack_attention(model)
    packed = model[1].layers[0].self_attn.in_proj_weight
    assert type(model[1].layers[0].self_attn) is nn.MultiheadAttention
    assert (packed.view(-1, 4) != 0).sum(-1).max() <= 2   # q, k and v rows, zeros kept
    assert "attention_unpacked" not in model._modelopt_lite
    names = {r["name"] for r in model._modelopt_lite["sparsity"]["layers"]}
    assert "1.layers.0.self_attn.out_proj" in names and "1.layers.0.self_attn.q_proj" not in names
    mtl.save(model, tmp_path)   # a packed, sparsified model saves and loads as it is
    fresh = encoder(seed=1)
    mtl.load(fresh, tmp_path)
    assert type(fresh[1].layers[0].self_attn) is nn.MultiheadAttention
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_int4_deploy_runs_the_unpacked_projections():
    model = encoder(d=128)
    x = torch.randn(2, 10, 16)
    mtl.quantize(model, "int4_weight_only", progress=False)
    with torch.no_grad():
        fake = model(x)
    mtl.deploy(model)
    from modelopt_lite.nn.int4_linear import int4_layers

    assert "1.layers.0.self_attn.q_proj" in int4_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, rtol=2e-3, atol=2e-3)


def test_pack_refuses_quantized_linears():
    model = encoder()
    mtl.quantize(model, "int8_weight_only", progress=False)
    with pytest.raises(ValueError, match="unquantize"):
        pack_attention(model)
    assert isinstance(model[1].layers[0].self_attn, LinearMultiheadAttention)


def test_subclasses_are_left_alone():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"a": Custom(E, H)})
    assert unpack_attention(model) == [] and type(model["a"]) is Custom


class _Padded(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x, pad):
        return self.body[2](self.body[1](self.body[0](x), src_key_padding_mask=pad))


def test_qdq_export_of_the_unpacked_attention(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from modelopt_lite.export.onnx import export_onnx
    from modelopt_lite.export.trt_check import trt_check
    from modelopt_lite.export.verify import compare_with_torch
    import onnx

    model = _Padded(encoder())
    x, pad = torch.randn(2, 10, 16), torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(x, pad), progress=False)
    result = export_onnx(model, (x, pad), tmp_path / "enc.onnx")
    assert compare_with_torch(model, (x, pad), result.path)["rel"] < 1e-5
    assert trt_check(result.path) == []
    graph = onnx.load(result.path).graph
    # 4 attention projections + 2 feed-forward linears per layer, 2 layers, the in/out linears:
    # each MatMul reads a quantized activation and a dequantized weight
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    producer = {o: n for n in graph.node for o in n.output}
    qdq = [m for m in matmuls if all(producer.get(i) is not None and
                                     producer[i].op_type == "DequantizeLinear"
                                     for i in m.input[:2])]
    assert len(qdq) == 14


def _tiny_wavlm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.WavLMConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, vocab_size=32)
    return transformers.WavLMForCTC(cfg).eval()


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_wavlm_attention_calls_its_linears(tmp_path):
    """WavLM hands its q/k/v/out weights to F.multi_head_attention_forward, so the linears never
    ran and stayed in float ('not called'); rerouted, they run, with the same outputs."""
    model = _tiny_wavlm()
    x = torch.randn(2, 1600)
    pad = torch.ones(2, 1600, dtype=torch.long)
    pad[1, 1200:] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=pad).logits
    rerouted = copy.deepcopy(model)
    assert unpack_attention(rerouted) == ["wavlm.encoder.layers.0.attention",
                                          "wavlm.encoder.layers.1.attention"]
    assert unpack_attention(rerouted) == []   # idempotent
    with torch.no_grad():
        torch.testing.assert_close(rerouted(x, attention_mask=pad).logits, ref)

    mtl.quantize(model, "w8a8", calib=torch.randn(4, 1600), progress=False)
    layers = model._modelopt_lite["layers"]
    assert not [r["name"] for r in layers if r["skipped"]]
    assert "wavlm.encoder.layers.1.attention.k_proj" in {r["name"] for r in layers}
    with torch.no_grad():
        out = model(x, attention_mask=pad).logits
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.1
    mtl.save(model, tmp_path)
    fresh = _tiny_wavlm()
    mtl.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, attention_mask=pad).logits, out)
    mtl.unquantize(model)   # packs (un-reroutes) the attention back
    assert "torch_multi_head_self_attention" not in model.wavlm.encoder.layers[0].attention.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=pad).logits, ref, rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and triton")
def test_gpu_fp16_encoder_quantized_and_deployed():
    """An nn.Transformer on the GPU in fp16: AWQ INT4 reaches every attention projection,
    including cross-attention, and the deployed Triton kernels compute what the fake-quant
    model did; under no_grad in eval (torch's fused-path conditions) the encoder runs the
    quantized layers."""
    from modelopt_lite.nn.int4_linear import Int4Linear

    torch.manual_seed(0)
    model = nn.Transformer(256, 4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=512, dropout=0.0, batch_first=True).cuda().half().eval()
    src = torch.randn(4, 24, 256, device="cuda", dtype=torch.half)
    tgt = torch.randn(4, 12, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(src, tgt).float()
    mtl.quantize(model, "int4_awq", forward_loop=lambda m: m(src, tgt), progress=False)
    assert not [r["name"] for r in model._modelopt_lite["layers"] if r["skipped"]]
    with torch.no_grad():
        fake = model(src, tgt).float()
        mtl.deploy(model)
        out = model(src, tgt).float()
    assert isinstance(model.decoder.layers[1].multihead_attn.k_proj, Int4Linear)
    assert isinstance(model.encoder.layers[0].self_attn.q_proj, Int4Linear)
    assert ((fake - ref).norm() / ref.norm()).item() < 0.2
    assert ((out - fake).norm() / fake.norm()).item() < 5e-3


def test_unquantize_packs_the_attention_back_unless_sparse():
    """After unquantize the model has its own modules and state-dict keys again (a plain
    save / load_state_dict round trip works); a sparsified model keeps the unpacked linears,
    which hold its q/k/v masks."""
    model = encoder()
    keys = list(model.state_dict())
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        ref = model(x)
    mtl.quantize(model, "w8a8", calib=[x], progress=False)
    mtl.unquantize(model)
    assert type(model[1].layers[0].self_attn) is nn.MultiheadAttention
    assert list(model.state_dict()) == keys
    fresh = encoder(seed=1)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)

    sparse = encoder()
    sparsify(sparse, "2:4", "magnitude")
    mtl.quantize(sparse, "int8_weight_only", progress=False)
    mtl.unquantize(sparse)
    assert isinstance(sparse[1].layers[0].self_attn, LinearMultiheadAttention)
