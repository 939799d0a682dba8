"""The two export-time ops and their ONNX translations.

During export a quant module calls these ops instead of its fake-quant forward (see
:mod:`.qdq_patterns`). Their eager implementations run the same math as
:class:`modelopt_lite.nn.functional.FakeQuantFunction` (``fake_quant`` and ``dequantize``), so
PyTorch and the exported graph compute the same thing; their ONNX translations emit the
Q/DQ nodes TensorRT reads:

* ``modelopt_lite::quantize_dequantize(x, scale)`` -> ``QuantizeLinear(x, scale, 0:int8)
  -> DequantizeLinear(., scale, 0:int8)`` (INT8 activations, scalar scale);
* ``modelopt_lite::dequantize_weight(q, scale, axis, block_size)`` ->
  ``DequantizeLinear(q, scale, axis=axis[, block_size=block_size])`` where ``q`` is an integer
  initializer (INT8, or INT8-held INT4 codes that export repacks as ONNX INT4).
"""

from __future__ import annotations

import numpy as np
import torch

from ..nn import functional as F


@torch.library.custom_op("modelopt_lite::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 symmetric per-tensor fake quantization (scale is a scalar in ``x``'s dtype)."""
    return F.fake_quant(x, scale.float(), None, 8, True).clone()


@quantize_dequantize.register_fake
def _(x, scale):
    return torch.empty_like(x)


def expand_scale(scale: torch.Tensor, shape, axis: int, block_size: int) -> torch.Tensor:
    """Broadcast a per-tensor / per-axis / blocked DQ scale to the full tensor ``shape``."""
    if scale.dim() == 0:
        return scale.expand(shape)
    if block_size:
        return scale.repeat_interleave(block_size, dim=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return scale.reshape(view).expand(shape)


@torch.library.custom_op("modelopt_lite::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, axis: int,
                      block_size: int) -> torch.Tensor:
    """Integer weight codes times their (per-tensor, per-channel or blocked) scale."""
    full = expand_scale(scale.float(), q.shape, axis, block_size)
    return F.dequantize(q.float(), full, None).to(scale.dtype)


@dequantize_weight.register_fake
def _(q, scale, axis, block_size):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def _int8_zero():
    from onnxscript import ir
    from onnxscript import opset18 as op

    return op.Constant(value=ir.tensor(np.array(0, dtype=np.int8)))


def _qdq_onnx(x, scale):
    from onnxscript import opset18 as op

    zero = _int8_zero()
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def _dq_onnx(q, scale, axis: int, block_size: int):
    if block_size:
        from onnxscript import opset21 as op21

        return op21.DequantizeLinear(q, scale, axis=axis, block_size=block_size)
    from onnxscript import opset18 as op

    return op.DequantizeLinear(q, scale, axis=axis)


def _is_all_true_onnx(x):
    """``aten._is_all_true``: what a model's ``torch._check`` on a tensor (Llava's image-token
    count) traces to. Only the dropped runtime assertion reads it, so the optimiser removes it;
    the exporter has no translation of its own."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    as_int = op.Cast(x, to=TensorProto.INT32)
    return op.Cast(op.ReduceMin(as_int, keepdims=0), to=TensorProto.BOOL)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.modelopt_lite.quantize_dequantize.default: _qdq_onnx,
            torch.ops.modelopt_lite.dequantize_weight.default: _dq_onnx,
            torch.ops.aten._is_all_true.default: _is_all_true_onnx}
