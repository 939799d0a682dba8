"""Export mode: turn each fake-quant layer into the Q/DQ pattern TensorRT builds.

Inside :func:`export_mode` every quant layer gets, for the duration of the export only,

* ``weight_int`` (int8 codes; INT4 codes held in int8) and ``weight_scale`` buffers, laid out
  the way the graph consumes them: Linear / Conv1D weights as ``[K, N]`` feeding ``MatMul``
  (per-channel ``axis=1``; INT4 blocks along ``axis=0``), Conv1d / Conv2d / Conv3d weights
  as ``[O, I, *kernel]`` (``axis=0``);
* ``weight_dq`` instead, for a conv with INT4 block weights: TensorRT's INT4 path is
  weight-only MatMul, so the conv's fake-quantized weight goes in as a float constant (the
  graph computes what the PyTorch model does; the conv runs in floating point);
* ``input_scale`` (INT8 activation Q/DQ, scalar) and ``input_pre_scale`` (an unfolded
  SmoothQuant/AWQ scale, exported as an explicit ``Mul``);
* a forward that calls the ops of :mod:`.qdq_ops`.

Everything TensorRT cannot take is refused up front by :func:`check_exportable`, naming the
layer, the constraint and the fix. The model is restored on exit, even after an error.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import quant_modules
from ..nn import functional as F
from ..nn.quant_modules import is_quant_conv
from . import qdq_ops  # noqa: F401  (registers torch.ops.modelopt_lite.*)

_BUFFERS = ("weight_int", "weight_scale", "weight_dq", "input_scale", "input_pre_scale",
            "input_rotation")
log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The model holds something the Q/DQ export cannot express for TensorRT."""


@dataclass
class WeightQ:
    codes: torch.Tensor  # int8; INT4 codes lie in [-8, 7]
    scale: torch.Tensor
    axis: int
    block_size: int  # 0 unless blocked
    num_bits: int


def _weight_problem(module: nn.Module) -> str | None:
    q = module.weight_quantizer
    if not q.enabled or dense_int4_conv(module):
        return None
    s = q.spec
    if not s.symmetric:
        return ("asymmetric (zero-point) weights; TensorRT takes zero points of 0 only. Fix: "
                "quantize with a symmetric spec (e.g. the 'int4_weight_only_sym' preset or "
                "symmetric=True)")
    if s.num_bits == 8 and s.granularity == "per_block":
        return ("INT8 block-wise weights; TensorRT blocks INT4 weights only. Fix: use "
                "granularity='per_channel' for INT8 weights")
    if s.num_bits == 4 and s.granularity != "per_block":
        return (f"INT4 {s.granularity} weights; TensorRT takes INT4 weights block-wise. Fix: "
                "use granularity='per_block' (block_size 64 or 128)")
    return None


def dense_int4_conv(module: nn.Module) -> bool:
    """A conv with INT4 block weights: exported as its fake-quantized float weight."""
    q = module.weight_quantizer
    return is_quant_conv(module) and q.enabled and q.spec.num_bits == 4


def _input_problem(module: nn.Module) -> str | None:
    q = module.input_quantizer
    if not q.enabled:
        return None
    s = q.spec
    if s.num_bits != 8:
        return ("INT4 activations; TensorRT's INT4 is weight-only. Fix: quantize activations "
                "to INT8 or not at all")
    if s.dynamic:
        return ("dynamic activation quantization; TensorRT needs static per-tensor scales. "
                "Fix: use the static 'w8a8' preset and calibrate")
    if s.granularity != "per_tensor" or not s.symmetric:
        return "activations must be symmetric per-tensor. Fix: use the 'w8a8' preset"
    if q.amax is None or q.amax.numel() != 1:
        return "the activation quantizer has no calibrated range. Fix: calibrate the model"
    return None


def check_exportable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quant layers of ``model``; raises :class:`ExportError` naming every bad layer."""
    layers = quant_modules(model)
    if not layers:
        raise ExportError("the model has no fake-quant layers, so there is nothing to export as "
                          "Q/DQ. Fix: run modelopt_lite.quantize(model, ...) first (or export "
                          "the float model with torch.onnx.export)")
    problems = []
    for name, module in layers:
        if not (is_quant_conv(module) or module.weight_2d().dim() == 2):
            problems.append(f"{name} ({type(module).__name__}): unsupported layer for Q/DQ "
                            "export. Fix: exclude it from quantization")
            continue
        for problem in (_weight_problem(module), _input_problem(module)):
            if problem:
                problems.append(f"{name} ({type(module).__name__}): {problem}")
    if problems:
        raise ExportError(f"{len(problems)} layer(s) cannot be exported for TensorRT:\n  "
                          + "\n  ".join(problems))
    return layers


def weight_q(module: nn.Module) -> WeightQ | None:
    """The integer weight and scale of one layer, laid out as the exported graph reads them."""
    q = module.weight_quantizer
    if not q.enabled:
        return None
    w2d = q._scaled(module.weight_2d().detach())
    dtype = module.weight.dtype
    s = q.spec
    if s.num_bits == 4:
        codes, scale, _, block = q.int4_codes(w2d)
        signed = codes.to(torch.int8) - 8
        return WeightQ(signed.t().contiguous(), scale.t().contiguous().to(dtype), 0, block, 4)
    scale, _ = q.scale_zero(w2d)
    codes = F.quantize(w2d.float(), scale, None, 8, True).to(torch.int8)
    scale = scale.reshape(-1) if s.granularity == "per_channel" else scale.reshape(())
    if is_quant_conv(module):
        return WeightQ(module.weight_from_2d(codes).contiguous(), scale.to(dtype), 0, 0, 8)
    return WeightQ(codes.t().contiguous(), scale.to(dtype), 1, 0, 8)


def _input(self, x: torch.Tensor) -> torch.Tensor:
    if self.input_rotation is not None:  # Reshape -> MatMul -> Reshape in the graph
        x = F.rotate_blocks(x, self.input_rotation)
    if self.input_pre_scale is not None:
        x = x * self.input_pre_scale
    if self.input_scale is not None:
        x = torch.ops.modelopt_lite.quantize_dequantize(x, self.input_scale)
    return x


def _weight(self) -> torch.Tensor:
    if self.weight_dq is not None:
        return self.weight_dq
    if self.weight_int is None:  # weight not quantized: the float weight, [K, N] for MatMul
        w2d = self.weight_quantizer._scaled(self.weight_2d())
        return self.weight_from_2d(w2d) if is_quant_conv(self) else w2d.t()
    return torch.ops.modelopt_lite.dequantize_weight(
        self.weight_int, self.weight_scale, self._export_axis, self._export_block)


def _linear_export_forward(self, x):
    y = torch.matmul(_input(self, x), _weight(self))
    return y + self.bias if self.bias is not None else y


def _conv_export_forward(self, x):
    return self._conv_forward(_input(self, x), _weight(self), self.bias)


def _install(module: nn.Module) -> None:
    dense = dense_int4_conv(module)
    wq = None if dense else weight_q(module)
    dtype = module.weight.dtype
    module.register_buffer("weight_dq", module.quantized_weight().detach().to(dtype)
                           if dense else None, persistent=False)
    iq = module.input_quantizer
    pre = iq.pre_quant_scale
    in_scale = None
    if iq.enabled:
        in_scale = F.scale_zero(None, iq.amax.reshape(()), 8, True)[0].to(dtype)
    module.register_buffer("weight_int", None if wq is None else wq.codes, persistent=False)
    module.register_buffer("weight_scale", None if wq is None else wq.scale, persistent=False)
    module.register_buffer("input_scale", in_scale, persistent=False)
    module.register_buffer("input_pre_scale", None if pre is None else pre.to(dtype).clone(),
                           persistent=False)
    rot = getattr(iq, "rotation", None)
    module.register_buffer("input_rotation", None if rot is None else rot.to(dtype).clone(),
                           persistent=False)
    module._export_axis = 0 if wq is None else wq.axis
    module._export_block = 0 if wq is None else wq.block_size
    fwd = _conv_export_forward if is_quant_conv(module) else _linear_export_forward
    module.forward = types.MethodType(fwd, module)


def _uninstall(module: nn.Module) -> None:
    for key in _BUFFERS:
        module._buffers.pop(key, None)
    for key in ("forward", "_export_axis", "_export_block"):
        module.__dict__.pop(key, None)


@contextmanager
def export_mode(model: nn.Module):
    """Swap every quant layer to its Q/DQ export forward; restore the model on exit."""
    layers = check_exportable(model)
    dense = [name for name, module in layers if dense_int4_conv(module)]
    if dense:
        log.warning("%d conv layer(s) with INT4 weights (first: %s) go into the graph as their "
                    "INT4-rounded weights in floating point: TensorRT has no INT4 convolution "
                    "(its INT4 path is weight-only MatMul), so they save no memory there; "
                    "quantize convs to INT8 (exclude them from the INT4 config and quantize "
                    "them with 'w8a8') for INT8 convs", len(dense), dense[0])
    try:
        for _, module in layers:
            _install(module)
        yield layers
    finally:
        for _, module in layers:
            _uninstall(module)

