"""Lint an ONNX file against TensorRT's Q/DQ and operator rules, before building an engine.

Each rule returns :class:`Finding` s (node name, op type, reason), reported the way TensorRT
10's ONNX parser lists its errors: a count first, then one line per node. Rules:

* ``opset``: default-domain opset below 13 (no per-axis Q/DQ), or below 21 with blocked DQ;
* ``op``: an operator outside TensorRT's supported set (:mod:`.trt_ops`) or a non-ONNX domain;
* ``zero_point``: a Q/DQ zero point that is not a constant 0;
* ``scale``: a Q/DQ scale that is not a constant, or has a non-positive / non-finite value;
* ``type``: a quantized type TensorRT has no Q/DQ layer for (e.g. UINT8);
* ``axis``: a per-channel Q/DQ without an explicit ``axis`` (TensorRT reads 0, ONNX means 1);
* ``int4_activation``: INT4 Q/DQ of a tensor that is not a constant weight;
* ``block``: blocked DQ of a non-INT4 type, a block size outside :data:`trt_ops.BLOCK_SIZES`,
  or an INT4 weight DQ that does not feed MatMul / Gemm.

Information (``severity="info"``, not errors): 2:4-sparsity-eligible weights, i.e. every
group of 4 consecutive input-dimension values holds at least 2 zeros.

Example::

    findings = trt_check("model.onnx")          # errors only
    print(format_findings(findings, "model.onnx"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import trt_ops
from .onnx_graph import attr, unpack_int4_onnx

QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    reason: str
    rule: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op_type}) [{self.rule}]: {self.reason}"


class Graph:
    """An ONNX graph with constants by name, producers and consumers; data loaded lazily."""

    def __init__(self, path):
        self.path = Path(path)
        self.model = onnx.load(str(path), load_external_data=False)
        g = self.model.graph
        self.consts = {t.name: t for t in g.initializer}
        for node in g.node:
            if node.op_type == "Constant" and attr(node, "value") is not None:
                self.consts[node.output[0]] = attr(node, "value")
        self.consumers: dict[str, list] = {}
        self.producer = {out: node for node in g.node for out in node.output}
        for node in g.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")),
                          0)

    def array(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        if t is None:
            return None
        if t.data_type in trt_ops.INT4_TYPES:
            return unpack_int4_onnx(self._raw(t), tuple(t.dims))
        return numpy_helper.to_array(t, base_dir=str(self.path.parent))

    def _raw(self, t) -> bytes:
        if t.data_location == TensorProto.EXTERNAL:
            t = onnx.TensorProto.FromString(t.SerializeToString())
            onnx.external_data_helper.load_external_data_for_tensor(t, str(self.path.parent))
        return t.raw_data

    def dtype(self, name: str) -> int | None:
        t = self.consts.get(name)
        return None if t is None else t.data_type


def _name(node, index: int) -> str:
    return node.name or f"#{index}"


def check_opset(graph: Graph) -> list[Finding]:
    out = []
    if graph.opset < trt_ops.MIN_OPSET:
        out.append(Finding("<model>", "opset", f"opset {graph.opset} < {trt_ops.MIN_OPSET}: "
                           "per-channel Q/DQ (axis) needs opset 13; re-export with opset>=13",
                           "opset"))
    blocked = any(n.op_type in QDQ and attr(n, "block_size", 0) for n in graph.model.graph.node)
    if blocked and graph.opset < trt_ops.BLOCKED_DQ_OPSET:
        out.append(Finding("<model>", "opset", f"blocked DequantizeLinear needs opset 21, the "
                           f"model imports {graph.opset}", "opset"))
    return out


def check_ops(graph: Graph) -> list[Finding]:
    out = []
    for i, node in enumerate(graph.model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            out.append(Finding(_name(node, i), node.op_type, f"operator of domain "
                               f"'{node.domain}' has no TensorRT importer (needs a plugin)"
                               + _hint(node.op_type), "op"))
        elif node.op_type not in trt_ops.SUPPORTED_OPS:
            out.append(Finding(_name(node, i), node.op_type, "operator outside TensorRT's "
                               "supported ONNX set" + _hint(node.op_type), "op"))
    return out


def _hint(op_type: str) -> str:
    hint = trt_ops.UNSUPPORTED_HINTS.get(op_type)
    return f"; fix: {hint}" if hint else ""


def _qtype(graph: Graph, node) -> int | None:
    """The quantized element type of a Q/DQ node (from its zero point, data or output_dtype)."""
    if len(node.input) > 2 and node.input[2]:
        return graph.dtype(node.input[2])
    if node.op_type == "DequantizeLinear":
        source = graph.producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            return _qtype(graph, source)
        return graph.dtype(node.input[0]) or TensorProto.INT8
    return attr(node, "output_dtype", 0) or TensorProto.UINT8


def check_qdq(graph: Graph) -> list[Finding]:
    out = []
    for i, node in enumerate(graph.model.graph.node):
        if node.op_type in QDQ:
            out += [Finding(_name(node, i), node.op_type, reason, rule)
                    for rule, reason in _qdq_problems(graph, node)]
    return out


def _qdq_problems(graph: Graph, node):
    scale = graph.array(node.input[1])
    if scale is None:
        yield "scale", f"scale '{node.input[1]}' is not a constant; TensorRT needs build-time scales"
    elif not (np.isfinite(scale).all() and (scale > 0).all()):
        yield "scale", f"scale '{node.input[1]}' has non-positive or non-finite values " \
                       f"(min {np.min(scale):g}); TensorRT needs positive scales"
    if len(node.input) > 2 and node.input[2]:
        zero = graph.array(node.input[2])
        if zero is None or np.any(zero != 0):
            yield "zero_point", "zero point is not a constant 0; TensorRT takes symmetric " \
                                "quantization only (re-export with a symmetric preset)"
    qtype = _qtype(graph, node)
    if qtype not in trt_ops.QUANT_TYPES:
        yield "type", f"quantized type {TensorProto.DataType.Name(qtype)} has no TensorRT " \
                      "Q/DQ layer; use INT8 (or INT4 for weights)"
    per_axis = scale is not None and scale.ndim == 1 and scale.size > 1
    if per_axis and attr(node, "axis") is None:
        yield "axis", "per-channel scale without an explicit 'axis': TensorRT reads axis 0, " \
                      "ONNX's default is 1; write the axis"
    is_weight = node.op_type == "DequantizeLinear" and node.input[0] in graph.consts
    if qtype in trt_ops.INT4_TYPES and not is_weight:
        yield "int4_activation", "INT4 quantization of a non-constant tensor: TensorRT's INT4 " \
                                 "is weight-only; quantize activations to INT8 or not at all"
    yield from _block_problems(graph, node, qtype, is_weight)


def _block_problems(graph: Graph, node, qtype, is_weight):
    block = attr(node, "block_size", 0)
    if block and qtype not in trt_ops.BLOCKED_TYPES:
        yield "block", f"block quantization of {TensorProto.DataType.Name(qtype)}: TensorRT " \
                       "blocks INT4 weights only; use per-channel INT8"
    if block and block not in trt_ops.BLOCK_SIZES:
        yield "block", f"block_size {block} is not one of {list(trt_ops.BLOCK_SIZES)}"
    if qtype in trt_ops.INT4_TYPES and is_weight:
        users = {n.op_type for n in graph.consumers.get(node.output[0], [])}
        if not users or not users <= trt_ops.INT4_CONSUMERS:
            yield "block", f"INT4 weight feeds {sorted(users) or 'nothing'}; TensorRT's INT4 " \
                           "weight-only path is DequantizeLinear -> MatMul/Gemm"


def sparsity_24_info(graph: Graph) -> list[Finding]:
    """Weights of MatMul / Gemm / Conv whose input dim is 2:4 sparse (information only)."""
    out = []
    for i, node in enumerate(graph.model.graph.node):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        w = _weight_of(graph, node.input[1])
        if w is None or w.ndim < 2:
            continue
        k_axis = {"MatMul": -2, "Conv": 1}.get(node.op_type, 1 if attr(node, "transB", 0) else 0)
        if _is_24(np.moveaxis(w, k_axis, -1)):
            out.append(Finding(_name(node, i), node.op_type, f"weight {list(w.shape)} is 2:4 "
                               "sparse along its input dim: eligible for sparse tensor cores "
                               "(build with the SPARSE_WEIGHTS flag)", "sparsity_2_4", "info"))
    return out


def _weight_of(graph: Graph, name: str) -> np.ndarray | None:
    if name in graph.consts:
        return graph.array(name)
    for node in graph.model.graph.node:
        if node.op_type == "DequantizeLinear" and name in node.output:
            return graph.array(node.input[0])
    return None


def _is_24(w: np.ndarray) -> bool:
    if w.shape[-1] % 4 or not w.size:
        return False
    zeros = (w.reshape(-1, 4) == 0).sum(-1)
    return bool((zeros >= 2).all()) and not bool((w == 0).all())


RULES = (check_opset, check_ops, check_qdq)


def trt_check(path, info: bool = False) -> list[Finding]:
    """Every node TensorRT would reject or misread (plus 2:4 information when ``info``)."""
    graph = Graph(path)
    findings = [f for rule in RULES for f in rule(graph)]
    return findings + sparsity_24_info(graph) if info else findings


def format_findings(findings: list[Finding], path="") -> str:
    errors = [f for f in findings if f.severity == "error"]
    infos = [f for f in findings if f.severity != "error"]
    lines = [f"{len(errors)} error(s): nodes TensorRT would reject or misread in {path}".rstrip()]
    lines += [f"  [{k}] {f}" for k, f in enumerate(errors, 1)]
    if infos:
        lines.append(f"{len(infos)} note(s):")
        lines += [f"  {f}" for f in infos]
    return "\n".join(lines)
