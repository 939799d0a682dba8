"""trt_check: one deliberately bad graph per rule (built with onnx.helper) must be flagged."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from modelopt_lite.cli import main  # noqa: E402
from modelopt_lite.export.onnx_graph import pack_int4_onnx  # noqa: E402
from modelopt_lite.export.trt_check import trt_check  # noqa: E402

K, N = 64, 32


def int4_tensor(name, codes):
    return h.make_tensor(name, T.INT4, codes.shape, pack_int4_onnx(codes), raw=True)


def build(tmp_path, *, opset=21, zp=0, zp_type=T.INT8, act_scale=0.05, scale_input=False,
          w_axis=1, w_scale=None, int4=False, block=64, int4_act=False, extra=(), w_codes=None,
          consumer="MatMul", name="m.onnx", external=False):
    """X[b, K] -> Q/DQ -> MatMul(DQ(W)) -> Y, with one knob per rule to break it."""
    rng = np.random.default_rng(0)
    inits = [h.make_tensor("zp", zp_type, [], [zp])]
    inputs = [h.make_tensor_value_info("X", T.FLOAT, ["batch", K])]
    if scale_input:
        inputs.append(h.make_tensor_value_info("act_scale", T.FLOAT, []))
    else:
        inits.append(nh.from_array(np.array(act_scale, np.float32), "act_scale"))
    q_attrs = {"output_dtype": T.INT4} if int4_act else {}
    q_inputs = ["X", "act_scale"] if int4_act else ["X", "act_scale", "zp"]
    nodes = [h.make_node("QuantizeLinear", q_inputs, ["xq"], name="act_q", **q_attrs),
             h.make_node("DequantizeLinear", ["xq", "act_scale"] + q_inputs[2:], ["xd"],
                         name="act_dq")]
    if int4:
        codes = w_codes if w_codes is not None else rng.integers(-8, 8, (K, N)).astype(np.int8)
        inits += [int4_tensor("W", codes),
                  nh.from_array(np.full((K // block, N), 0.01, np.float32), "w_scale")]
        w_dq = h.make_node("DequantizeLinear", ["W", "w_scale"], ["wd"], name="w_dq", axis=0,
                           block_size=block)
    else:
        codes = w_codes if w_codes is not None else rng.integers(-127, 128, (K, N)).astype(np.int8)
        scale = w_scale if w_scale is not None else np.full(N, 0.01, np.float32)
        inits += [nh.from_array(codes, "W"), nh.from_array(scale, "w_scale")]
        w_attrs = {} if w_axis is None else {"axis": w_axis}
        w_dq = h.make_node("DequantizeLinear", ["W", "w_scale"], ["wd"], name="w_dq", **w_attrs)
    nodes += [w_dq, h.make_node(consumer, ["xd", "wd"], ["Y"], name="mm"), *extra]
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("Y", T.FLOAT, None)],
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset),
                                               h.make_opsetid("com.microsoft", 1)])
    path = tmp_path / name
    onnx.save_model(model, str(path), save_as_external_data=external,
                    location=name + ".data", size_threshold=0)
    return path


def rules(path):
    return [(f.node, f.rule) for f in trt_check(path)]


def test_good_graphs_pass(tmp_path):
    assert trt_check(build(tmp_path)) == []
    assert trt_check(build(tmp_path, int4=True, name="i4.onnx")) == []
    assert trt_check(build(tmp_path, int4=True, external=True, name="ext.onnx")) == []


@pytest.mark.parametrize("knobs, expected", [
    (dict(zp=3), [("act_q", "zero_point"), ("act_dq", "zero_point")]),
    (dict(scale_input=True), [("act_q", "scale"), ("act_dq", "scale")]),
    (dict(act_scale=-0.05), [("act_q", "scale"), ("act_dq", "scale")]),
    (dict(w_scale=np.r_[np.zeros(1), np.full(N - 1, 0.01)].astype(np.float32)),
     [("w_dq", "scale")]),
    (dict(w_axis=None), [("w_dq", "axis")]),
    (dict(int4_act=True), [("act_q", "int4_activation"), ("act_dq", "int4_activation")]),
    (dict(int4=True, block=16), [("w_dq", "block")]),
    (dict(int4=True, consumer="Add"), [("w_dq", "block")]),
    (dict(zp_type=T.UINT8, zp=0), [("act_q", "type"), ("act_dq", "type")]),
    (dict(opset=11), [("<model>", "opset")]),
    (dict(int4=True, opset=19), [("<model>", "opset")]),
    (dict(extra=[h.make_node("Unique", ["Y"], ["u"], name="uniq")]), [("uniq", "op")]),
    (dict(extra=[h.make_node("MatMulNBits", ["Y"], ["z"], name="mnb", domain="com.microsoft")]),
     [("mnb", "op")]),
])
def test_each_rule_flags_its_bad_graph(tmp_path, knobs, expected):
    assert rules(build(tmp_path, **knobs)) == expected


def test_blocked_int8_is_flagged(tmp_path):
    path = build(tmp_path)
    model = onnx.load(str(path))
    dq = next(n for n in model.graph.node if n.name == "w_dq")
    dq.attribute.append(h.make_attribute("block_size", 32))
    w_scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    w_scale.CopyFrom(nh.from_array(np.full((K // 32, N), 0.01, np.float32), "w_scale"))
    onnx.save(model, str(path))
    findings = trt_check(path)
    assert [(f.node, f.rule) for f in findings] == [("w_dq", "block")]
    assert "INT8" in findings[0].reason


def test_24_sparse_weights_are_information_not_errors(tmp_path):
    codes = np.random.default_rng(1).integers(1, 127, (K, N)).astype(np.int8)
    codes[0::4] = 0
    codes[2::4] = 0  # two zeros in every 4 consecutive input-dim (K) values
    path = build(tmp_path, w_codes=codes)
    assert trt_check(path) == []
    info = trt_check(path, info=True)
    assert [(f.node, f.rule, f.severity) for f in info] == [("mm", "sparsity_2_4", "info")]
    dense = build(tmp_path, name="dense.onnx")
    assert trt_check(dense, info=True) == []
    along_n = np.random.default_rng(2).integers(1, 127, (K, N)).astype(np.int8)
    along_n[:, 0::4] = 0
    along_n[:, 2::4] = 0  # 2:4 along the output dim, which sparse tensor cores do not use
    assert trt_check(build(tmp_path, w_codes=along_n, name="n.onnx"), info=True) == []


def test_cli_check_counts_first_and_exits_nonzero(tmp_path, capsys):
    bad = build(tmp_path, zp=3, w_axis=None)
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3 error(s)")
    assert any("act_q" in line and "QuantizeLinear" in line and "zero point" in line
               for line in out)
    assert main(["check", str(build(tmp_path, name="good.onnx"))]) == 0
    assert capsys.readouterr().out.startswith("0 error(s)")


def test_cli_check_on_a_file_that_is_not_onnx_exits_2(tmp_path, capsys):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff\xff")
    assert main(["check", str(bad)]) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err
