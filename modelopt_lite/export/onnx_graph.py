"""Edits on the exported ONNX graph: ONNX INT4 packing, unused initializers, axis names.

ONNX INT4 packing (the one place export converts INT4 layouts): the tensor is flattened in
row-major order and element ``2i`` goes in the low nibble of byte ``i``, element ``2i + 1`` in
its high nibble (two's complement); an odd count leaves the last high nibble 0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def pack_int4_onnx(codes: np.ndarray) -> bytes:
    """Signed INT4 codes in [-8, 7] (any integer dtype) -> ONNX INT4 raw bytes."""
    flat = np.asarray(codes).astype(np.int16).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("INT4 codes must lie in [-8, 7]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4_onnx(raw: bytes, shape) -> np.ndarray:
    """ONNX INT4 raw bytes -> int8 codes of ``shape`` (the inverse of :func:`pack_int4_onnx`)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nib = np.stack([b & 0xF, b >> 4], axis=1).reshape(-1)[: int(np.prod(shape))]
    return np.where(nib > 7, nib.astype(np.int16) - 16, nib).astype(np.int8).reshape(shape)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def repack_int4_initializers(model: onnx.ModelProto) -> int:
    """INT8-held codes feeding a blocked DequantizeLinear become packed INT4 initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not attr(node, "block_size", 0):
            continue
        tensor = inits.get(node.input[0])
        if tensor is None or tensor.data_type != TensorProto.INT8:
            continue
        codes = numpy_helper.to_array(tensor)
        packed = onnx.helper.make_tensor(tensor.name, TensorProto.INT4, codes.shape,
                                         pack_int4_onnx(codes), raw=True)
        tensor.CopyFrom(packed)
        done += 1
    return done


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    if dropped:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return dropped


def rename_dims(model: onnx.ModelProto, names: dict[str, dict[int, str]]) -> None:
    """Give the symbolic input dims readable names (``batch``, ``seq``) across the graph."""
    mapping = {}
    for value in model.graph.input:
        for axis, label in names.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param:
                mapping.setdefault(dims[axis].dim_param, label)
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total
