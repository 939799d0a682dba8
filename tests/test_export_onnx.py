"""Q/DQ ONNX export: each pattern from a tiny model, run in onnxruntime against PyTorch."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.config import QuantConfig, QuantizerSpec  # noqa: E402
from modelopt_lite.export.onnx import export_onnx  # noqa: E402
from modelopt_lite.export.onnx_graph import attr, pack_int4_onnx, unpack_int4_onnx  # noqa: E402
from modelopt_lite.export.qdq_patterns import ExportError  # noqa: E402
from modelopt_lite.nn import is_quantized  # noqa: E402
from modelopt_lite.export.trt_check import trt_check  # noqa: E402
from modelopt_lite.export.verify import compare_with_torch, run_onnx, run_torch  # noqa: E402
from tiny_models import random_tokens, tiny_llama  # noqa: E402

INT4_SYM = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=32))


def nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def inits(model):
    return {t.name: t for t in model.graph.initializer}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).eval()


def conv_weight_dqs(m):
    """(Conv, the DequantizeLinear feeding its weight) of every Conv node, each checked to be
    per output channel: axis 0, one scale per output channel."""
    init, pairs = inits(m), []
    for conv in nodes(m, "Conv"):
        dq = next(n for n in m.graph.node if n.output[0] == conv.input[1])
        assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == 0
        assert list(init[dq.input[1]].dims) == [init[dq.input[0]].dims[0]]
        pairs.append((conv, dq))
    return pairs


def calibrated(model, data):
    return mtl.quantize(model, "w8a8", forward_loop=lambda m: m(data), progress=False)


@pytest.fixture(scope="module")
def llama_w8a8(tmp_path_factory):
    model = tiny_llama(layers=2, kv_heads=2)
    ids = random_tokens(2, 16)
    calibrated(model, ids)
    smooth = model.model.layers[0].mlp.down_proj.input_quantizer
    smooth.set_pre_quant_scale(0.5 + torch.rand(128))  # an unfolded smoothing scale
    path = tmp_path_factory.mktemp("w8a8") / "llama.onnx"
    return model, export_onnx(model, ids, path), ids


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    model = mtl.quantize(tiny_llama(layers=1, kv_heads=2), INT4_SYM, progress=False)
    path = tmp_path_factory.mktemp("int4") / "llama_int4.onnx"
    return model, export_onnx(model, random_tokens(1, 8), path)


@pytest.fixture(scope="module")
def cnn_w8a8(tmp_path_factory):
    model = calibrated(small_cnn(), torch.randn(8, 3, 16, 16))
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    return model, export_onnx(model, torch.randn(2, 3, 16, 16), path)


def test_llama_w8a8_activation_and_weight_patterns(llama_w8a8):
    model, result, _ = llama_w8a8
    m = onnx.load(str(result.path))
    init = inits(m)
    qs = nodes(m, "QuantizeLinear")
    assert qs and result.opset >= 13
    for q in qs:  # activations: scalar scale, int8 zero point 0
        zero = onnx.numpy_helper.to_array(init[q.input[2]])
        assert init[q.input[1]].dims == [] and zero.dtype == np.int8 and zero == 0
    weight_dq = [n for n in nodes(m, "DequantizeLinear") if n.input[0] in init]
    assert len(weight_dq) == 14  # 7 linears x 2 layers
    for dq in weight_dq:
        w, s = init[dq.input[0]], init[dq.input[1]]
        assert w.data_type == onnx.TensorProto.INT8 and attr(dq, "axis") == 1
        assert list(s.dims) == [w.dims[1]]  # per output channel of the [K, N] weight
        users = [n.op_type for n in m.graph.node if dq.output[0] in n.input]
        assert users == ["MatMul"]
    down = init["model.model.layers.0.mlp.down_proj.weight_int"]
    q = model.model.layers[0].mlp.down_proj
    ref = torch.round(q.weight.detach() / q.weight_quantizer.scale_zero()[0]).clamp(-128, 127).t()
    assert np.array_equal(onnx.numpy_helper.to_array(down), ref.numpy().astype(np.int8))
    assert "model.model.layers.0.mlp.down_proj.input_pre_scale" in {
        i for n in nodes(m, "Mul") for i in n.input}  # the explicit smoothing Mul


def test_llama_w8a8_matches_torch_with_dynamic_axes(llama_w8a8):
    model, result, ids = llama_w8a8
    err = compare_with_torch(model, ids, result.path)
    assert err["rel"] < 1e-5, err
    m = onnx.load(str(result.path))
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    other = random_tokens(3, 23, seed=11)  # another batch and length than the export's
    # dynamic axes are what this checks: a wrong shape path is off by O(1); a value that float
    # op order (the online rotation's MatMul) puts on the other side of an INT8 rounding
    # boundary moves one token's logits by ~1e-3, so the bound here is looser than above
    assert compare_with_torch(model, other, result.path)["rel"] < 1e-2
    assert trt_check(result.path) == []


def test_llama_int4_blocked_pattern(llama_int4):
    model, result = llama_int4
    m = onnx.load(str(result.path))
    init = inits(m)
    assert result.opset == 21 and result.int4_initializers == 7
    assert not nodes(m, "QuantizeLinear")  # weight-only: activations stay float
    for dq in nodes(m, "DequantizeLinear"):
        w, s = init[dq.input[0]], init[dq.input[1]]
        assert w.data_type == onnx.TensorProto.INT4
        assert attr(dq, "axis") == 0 and attr(dq, "block_size") == 32
        assert list(s.dims) == [w.dims[0] // 32, w.dims[1]]
        assert [n.op_type for n in m.graph.node if dq.output[0] in n.input] == ["MatMul"]
    layer = model.model.layers[0].mlp.up_proj
    codes = layer.weight_quantizer.int4_codes(layer.weight)[0].to(torch.int8) - 8
    t = init["model.model.layers.0.mlp.up_proj.weight_int"]
    assert np.array_equal(unpack_int4_onnx(t.raw_data, tuple(t.dims)), codes.t().numpy())
    err = compare_with_torch(model, random_tokens(2, 12), result.path)
    assert err["rel"] < 1e-5, err
    assert trt_check(result.path) == []


def test_cnn_conv_per_channel_axis0(cnn_w8a8):
    model, result = cnn_w8a8
    assert len(conv_weight_dqs(onnx.load(str(result.path)))) == 2
    x = torch.randn(5, 3, 16, 16)  # batch 5: dynamic batch axis
    assert compare_with_torch(model, x, result.path)["rel"] < 1e-5
    # onnxruntime's optimizer turns the conv bias into int32 (bias / (s_x * s_w)), as
    # TensorRT does, so a few activations round one step apart; still near the fake-quant model
    runtime = compare_with_torch(model, x, result.path, level="basic")
    floating = mtl.unquantize(copy.deepcopy(model))
    quant_err = np.linalg.norm(run_torch(floating, x) - run_torch(model, x))
    assert runtime["rel"] * np.linalg.norm(run_torch(model, x)) < 0.5 * quant_err
    assert trt_check(result.path) == []


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_per_channel_axis0(dims, tmp_path):
    """A Conv1d (audio front end) and a Conv3d (video patch embedding) stack, W8A8: Q/DQ on
    the input, DequantizeLinear(axis=0) on the [O, I, *kernel] weight, in onnxruntime as in
    PyTorch, and TensorRT-clean."""
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    model = nn.Sequential(conv(4, 8, 3, padding=1), nn.GELU(), conv(8, 16, 3, stride=2),
                          nn.Flatten(), nn.LazyLinear(10))
    shape = {1: (4, 32), 3: (4, 4, 8, 8)}
    model(torch.randn(1, *shape[dims]))   # sizes the lazy linear
    model = calibrated(model.eval(), torch.randn(8, *shape[dims]))
    result = export_onnx(model, torch.randn(2, *shape[dims]), tmp_path / "conv.onnx")
    m = onnx.load(str(result.path))
    init = inits(m)
    pairs = conv_weight_dqs(m)
    assert len(pairs) == 2
    for c, dq in pairs:
        assert len(init[dq.input[0]].dims) == dims + 2
        qx = next(n for n in m.graph.node if n.output[0] == c.input[0])
        assert qx.op_type == "DequantizeLinear"
    x = torch.randn(3, *shape[dims])
    assert compare_with_torch(model, x, result.path)["rel"] < 1e-5
    assert trt_check(result.path) == []


def test_external_data_round_trip(cnn_w8a8, tmp_path):
    model, inline = cnn_w8a8
    result = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx",
                         external_data=True)
    assert result.data_path == tmp_path / "cnn.onnx.data" and result.data_path.exists()
    graph = onnx.load(str(result.path), load_external_data=False)
    where = {t.name: t.data_location for t in graph.graph.initializer}
    assert where["2.weight_int"] == where["5.weight_int"] == onnx.TensorProto.EXTERNAL
    assert where["2.weight_scale"] == onnx.TensorProto.DEFAULT  # small tensors stay inline
    assert result.path.stat().st_size < 0.5 * inline.path.stat().st_size
    a, b = onnx.load(str(inline.path)), onnx.load(str(result.path))
    for name, t in inits(a).items():
        assert np.array_equal(onnx.numpy_helper.to_array(t),
                              onnx.numpy_helper.to_array(inits(b)[name])), name
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (result.path, result.data_path):
        os.replace(f, moved / f.name)
    x = torch.randn(3, 3, 16, 16)
    assert np.allclose(run_onnx(moved / "cnn.onnx", model, x), run_torch(model, x), atol=1e-5)
    assert trt_check(moved / "cnn.onnx") == []


def test_pack_int4_matches_onnx_reference():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for shape in [(6, 4), (3, 5)]:  # even and odd element counts
        codes = np.random.randint(-8, 8, size=shape).astype(np.int8)
        ref = onnx.numpy_helper.from_array(codes.astype(ml_dtypes.int4), "w")
        assert pack_int4_onnx(codes) == ref.raw_data
        assert np.array_equal(unpack_int4_onnx(ref.raw_data, shape), codes)
    assert pack_int4_onnx(np.array([1, -1, 7, -8])) == bytes([0xF1, 0x87])  # low nibble first


def _left(folder):
    return sorted(p.name for p in folder.iterdir())


def test_no_quantizers_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no fake-quant layers"):
        export_onnx(small_cnn(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert _left(tmp_path) == []


@pytest.mark.parametrize("config, match", [
    (QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=32,
                                      symmetric=False)), "asymmetric.*symmetric"),
    ("w8a8_dynamic", "dynamic activation"),
])
def test_non_trt_quantizers_are_refused(tmp_path, config, match):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    mtl.quantize(model, config, forward_loop=lambda m: m(torch.randn(4, 64)), progress=False)
    with pytest.raises(ExportError, match=match) as err:
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx")
    assert "0 (" in str(err.value) and "Fix" in str(err.value)  # names the layer, the fix
    assert _left(tmp_path) == []


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_conv_exports_as_its_rounded_float_weight(tmp_path, symmetric, caplog):
    """TensorRT has no INT4 convolution: a conv with INT4 block weights (symmetric or not)
    goes into the graph as its INT4-rounded weight in floating point, with a warning; the
    graph computes what the fake-quant model does, and a symmetric INT4 linear beside it
    keeps its blocked DequantizeLinear."""
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=8,
                                           symmetric=symmetric))
    # convs take INT4 block weights only when named (targets); the linear "5" by default
    model = mtl.quantize(small_cnn(), cfg.replace(targets=("*", "2"),
                                                  exclude=() if symmetric else ("5",)),
                         progress=False)
    assert is_quantized(model[2]) and not is_quantized(model[0])
    with caplog.at_level("WARNING"):
        result = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert "TensorRT has no INT4 convolution" in caplog.text
    m = onnx.load(str(result.path))
    conv = nodes(m, "Conv")[1]
    w = onnx.numpy_helper.to_array(inits(m)[conv.input[1]])   # a float constant, no DQ
    assert np.array_equal(w, model[2].quantized_weight().detach().numpy())
    blocks = w.reshape(-1, 8)   # [O, I*kh*kw] in blocks of 8: at most 16 levels each
    assert max(len(np.unique(b)) for b in blocks) <= 16
    dq = [n for n in nodes(m, "DequantizeLinear") if attr(n, "block_size") == 8]
    assert len(dq) == (1 if symmetric else 0)
    x = torch.randn(3, 3, 16, 16)
    assert compare_with_torch(model, x, result.path)["rel"] < 1e-5


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_conv_padding_modes_export(mode, tmp_path):
    """A conv that pads its own way (Autoformer's and Informer's circular Conv1d) exports
    through the layer's own padding, W8A8, in onnxruntime as in PyTorch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, padding_mode=mode), nn.GELU(),
                          nn.Conv1d(16, 8, 3, padding=1)).eval()
    model = calibrated(model, torch.randn(4, 8, 24))
    result = export_onnx(model, torch.randn(2, 8, 24), tmp_path / "pad.onnx")
    assert compare_with_torch(model, torch.randn(3, 8, 24), result.path)["rel"] < 1e-5
    assert trt_check(result.path) == []


def test_int4_conv_alone_needs_no_int4_opset(tmp_path):
    """A conv named into INT4 goes in as float weights: opset 17 takes the graph."""
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=8),
                      targets=("2",))
    model = mtl.quantize(small_cnn(), cfg, progress=False)
    result = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=17)
    assert onnx.load(str(result.path)).opset_import[0].version == 17
    assert compare_with_torch(model, torch.randn(2, 3, 16, 16), result.path)["rel"] < 1e-5


def test_opset_too_low_for_int4(tmp_path):
    model = mtl.quantize(nn.Sequential(nn.Linear(64, 16)), INT4_SYM, progress=False)
    with pytest.raises(ExportError, match="opset 21"):
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", opset=17)
    assert _left(tmp_path) == []


def test_unwritable_path_is_refused(tmp_path):
    model = mtl.quantize(nn.Sequential(nn.Linear(64, 16)), "int8_weight_only", progress=False)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, torch.randn(2, 64), tmp_path / "missing" / "m.onnx")
    assert _left(tmp_path) == []


def test_failure_mid_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    model = mtl.quantize(nn.Sequential(nn.Linear(64, 16)), "int8_weight_only", progress=False)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def broken_check(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, torch.randn(2, 64), target, external_data=True)
    assert _left(tmp_path) == ["m.onnx"] and target.read_bytes() == b"previous"
    assert type(model[0]).__name__ == "QuantLinear" and "forward" not in model[0].__dict__


class RowLoop(nn.Module):
    """Walks the batch in Python: tracing fixes the batch axis at the example's size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)

    def forward(self, x):
        return torch.stack([self.fc(x[i]) for i in range(x.shape[0])])


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y


@pytest.mark.parametrize("batch", [3, 1])
def test_axis_the_model_fixes_is_kept_static_with_a_warning(tmp_path, caplog, batch):
    """A batch of 1 is traced widened to 2; the axis the model fixes keeps the example's 1."""
    model = mtl.quantize(RowLoop(), "w8a8", forward_loop=lambda m: m(torch.randn(4, 64)),
                         progress=False)
    x = torch.randn(batch, 64)
    with caplog.at_level("WARNING", logger="modelopt_lite.export.onnx"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert f"RowLoop: the model's code fixes input_0 axis 0 = {batch}" in caplog.text
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [batch, 64]
    assert compare_with_torch(model, x, tmp_path / "m.onnx")["rel"] < 1e-5


def test_untraceable_model_names_the_model_and_the_cause(tmp_path):
    model = mtl.quantize(DataDependent(), "int8_weight_only", progress=False)
    with pytest.raises(ExportError, match=r"failed on DataDependent: \w+") as err:
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx")
    assert "Fix" in str(err.value) and err.value.__cause__ is not None
    assert _left(tmp_path) == []


@pytest.mark.parametrize("arch", ["t5", "longt5"])
@pytest.mark.parametrize("config", ["int4_sym", "w8a8"])
def test_encoder_decoder_exports_with_its_decoder_inputs(tmp_path, arch, config):
    """T5: the decoder's tokens (the text shifted right when the example gives none) are a
    graph input with their own symbolic length; onnxruntime computes what PyTorch does.
    LongT5's local attention needs the attention mask eager code would build.

    Weight-only, the graph must agree to float rounding. With 8-bit activations a value
    that another float op order (another CPU's kernels) puts on the other side of a rounding
    boundary moves the logits by ~1e-3 (T5's unscaled attention amplifies it), so there the
    bound is the one a wrong graph (off by O(1)) cannot meet."""
    from modelopt_lite.calib.runner import decoder_inputs
    from tiny_models import tiny_longt5, tiny_t5

    model = {"t5": tiny_t5, "longt5": tiny_longt5}[arch]()
    quant = {"int4_sym": INT4_SYM, "w8a8": "w8a8"}[config]
    model = mtl.quantize(model, quant, calib=random_tokens(4, 16), progress=False)
    ids = random_tokens(2, 12, seed=5)
    result = export_onnx(model, ids, tmp_path / f"{arch}.onnx")
    m = onnx.load(str(result.path))
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "decoder_input_ids": ["batch", "decoder_seq"]}
    bound = 1e-5 if config == "int4_sym" else 2e-2
    assert compare_with_torch(model, ids, result.path)["rel"] < bound
    other = {"input_ids": random_tokens(3, 9, seed=6),
             "decoder_input_ids": decoder_inputs(model, random_tokens(3, 5, seed=7))[
                 "decoder_input_ids"]}   # other lengths on each side
    assert compare_with_torch(model, other, result.path)["rel"] < bound
    assert trt_check(result.path) == []


def test_multimodal_model_exports_its_image_input(tmp_path):
    """Llava with an image: pixel values are a graph input beside the text, the vision tower
    stays float (no Q/DQ on it), and onnxruntime computes what PyTorch does."""
    from tiny_models import IMAGE_TOKEN, tiny_llava

    model = mtl.quantize(tiny_llava(), "w8a8", calib=random_tokens(4, 16), progress=False)
    ids = random_tokens(1, 24, seed=5)
    ids[0, 2:18] = IMAGE_TOKEN   # 16 patches of one 32 x 32 image
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "pixel_values": pixels}
    result = export_onnx(model, inputs, tmp_path / "llava.onnx")
    m = onnx.load(str(result.path))
    assert [i.name for i in m.graph.input] == ["input_ids", "pixel_values"]
    quantized = [t.name for t in m.graph.initializer if t.name.endswith("_int")]
    assert quantized and not any("vision_tower" in n for n in quantized)   # text layers only
    err = compare_with_torch(model, inputs, result.path)
    assert err["rel"] < 1e-5, err
    assert not nodes(m, "ReduceMin") and trt_check(result.path) == []   # no runtime checks
    with pytest.raises(ExportError, match=r"image_grid_thw.*Fix"):
        export_onnx(model, inputs | {"image_grid_thw": torch.ones(1, 3)}, tmp_path / "x.onnx")


def test_speech_encoder_decoder_exports_its_features(tmp_path):
    """Whisper: log-mel features and the decoder's tokens are the graph inputs."""
    from tiny_models import tiny_seq2seq

    model = tiny_seq2seq("whisper")
    g = torch.Generator().manual_seed(0)
    inputs = {"input_features": torch.randn(2, 16, 64, generator=g),
              "decoder_input_ids": random_tokens(2, 6, seed=1)}
    mtl.quantize(model, INT4_SYM, progress=False)
    result = export_onnx(model, inputs, tmp_path / "whisper.onnx")
    m = onnx.load(str(result.path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}
    assert dims == {"decoder_input_ids": ["batch", "decoder_seq"],
                    "input_features": ["batch", 16, 64]}
    assert compare_with_torch(model, inputs, result.path)["rel"] < 1e-5
    with pytest.raises(ExportError, match="decoder_input_ids beside input_features"):
        export_onnx(model, {"input_features": inputs["input_features"]}, tmp_path / "x.onnx")


def test_generative_model_inputs_call_options_and_refusals(tmp_path, caplog):
    """Call options a batch carries (use_cache, labels) are left out with a note; more than
    (input_ids, attention_mask) positionally, or an input the wrapper cannot pass, is refused
    by name and nothing is written."""
    model = mtl.quantize(tiny_llama(layers=1, kv_heads=2), INT4_SYM, progress=False)
    ids = random_tokens(2, 8)
    with caplog.at_level("INFO", logger="modelopt_lite.export.onnx"):
        result = export_onnx(model, {"input_ids": ids, "use_cache": False, "labels": ids},
                             tmp_path / "m.onnx")
    assert "['labels', 'use_cache'] are call options" in caplog.text
    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["input_ids"]
    with pytest.raises(ExportError, match="as a dict of named inputs"):
        export_onnx(model, (ids, torch.ones_like(ids), ids), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match=r"\['inputs_embeds'\].*Fix"):
        export_onnx(model, {"input_ids": ids, "inputs_embeds": torch.randn(2, 8, 64)},
                    tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_encoder_classifier_exports_with_its_class_logits(tmp_path, caplog, arch):
    """An encoder-only classifier (BERT, the classic TensorRT INT8 model; DeBERTa's relative
    attention): W8A8 Q/DQ on every linear, [batch, labels] logits, both axes of the text
    dynamic, and no alarming note from the optimizer's constant folding (BERT's token-type
    buffer cannot be folded; that node simply stays)."""
    from tiny_models import tiny_encoder_classifier

    model = mtl.quantize(tiny_encoder_classifier(arch), "w8a8", calib=random_tokens(4, 16),
                         progress=False)
    ids = random_tokens(2, 12, seed=5)
    with caplog.at_level("WARNING"):
        result = export_onnx(model, ids, tmp_path / f"{arch}.onnx")
    assert "Evaluation failed" not in caplog.text
    m = onnx.load(str(result.path))
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    out = m.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["batch", 3]
    linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and "classifier" not in n and "pooler" not in n]
    quantized = {t.name for t in m.graph.initializer if t.name.endswith("_int")}
    assert len(quantized) >= len(linears) > 0
    # 8-bit activations: the rounding-boundary bound of the T5 test above
    for x in (ids, random_tokens(3, 7, seed=6)):
        assert compare_with_torch(model, x, result.path)["rel"] < 2e-2
    assert trt_check(result.path) == []
