"""Fake-quant wrappers for Linear, Conv1d / Conv2d / Conv3d and Hugging Face's Conv1D.

Wrapping swaps the module's class for a quantized subclass in place: parameters, state-dict
keys, weight tying and hooks stay as they were, and the weights are not copied. Two
TensorQuantizer children are added, ``input_quantizer`` and ``weight_quantizer``; the weight
quantizer always sees the weight as a 2-D ``[out, in]`` view (a conv's ``[out, in/groups *
kernel]``, its weight flattened after the output channels).

Example::

    wrap_module(model.fc, weight_spec=QuantizerSpec(num_bits=8), name="fc")
    y = model.fc(x)          # fake-quantized
    unwrap_module(model.fc)  # back to the float module
"""

from __future__ import annotations

import torch
import torch.nn.functional as torchF
from torch import nn

from ..config import QuantizerSpec
from .tensor_quantizer import TensorQuantizer


class QuantModuleMixin:
    """Shared forward: quantize the input, fake-quantize the weight, run the float op."""

    _float_cls: type

    def _init_quantizers(self, weight_spec, input_spec, name: str) -> None:
        self.weight_quantizer = _quantizer(weight_spec, f"{name}.weight", True)
        self.input_quantizer = _quantizer(input_spec, f"{name}.input", False)
        self.layer_name = name

    # subclasses define: _to_2d(t) (the weight's [out, in] view), weight_from_2d(w2d),
    # _float_forward(x, weight)
    def weight_2d(self) -> torch.Tensor:
        return self._to_2d(self.weight)

    def mask_2d(self) -> torch.Tensor | None:
        """The 2:4 sparsity mask as a 2-D ``[out, in]`` view (None when not sparse)."""
        mask = self._buffers.get("weight_mask")
        return None if mask is None else self._to_2d(mask)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight_from_2d(self.weight_quantizer(self.weight_2d()))
        mask = self._buffers.get("weight_mask")  # 2:4 sparsity: pruned weights stay exactly 0
        return w if mask is None else w * mask.to(w.dtype)

    def forward(self, x):
        return self._float_forward(self.input_quantizer(x), self.quantized_weight())

    @property
    def in_features_2d(self) -> int:
        return self.weight_2d().shape[1]


class QuantLinear(QuantModuleMixin, nn.Linear):
    def _to_2d(self, t):
        return t

    def weight_from_2d(self, w2d):
        return w2d

    def _float_forward(self, x, weight):
        return torchF.linear(x, weight, self.bias)


class _ConvOps(QuantModuleMixin):
    """A torch convolution (1-, 2- or 3-D): the weight ``[out, in/groups, *kernel]`` viewed
    as ``[out, in/groups * prod(kernel)]``."""

    def _to_2d(self, t):
        return t.flatten(1)

    def weight_from_2d(self, w2d):
        return w2d.reshape(self.weight.shape)

    def _float_forward(self, x, weight):
        return self._conv_forward(x, weight, self.bias)


class QuantConv1d(_ConvOps, nn.Conv1d):
    pass


class QuantConv2d(_ConvOps, nn.Conv2d):
    pass


class QuantConv3d(_ConvOps, nn.Conv3d):
    pass


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_quant_conv(module: nn.Module) -> bool:
    """A fake-quant torch convolution (not Hugging Face's Conv1D, which is a linear)."""
    return isinstance(module, _ConvOps)


class _Conv1DOps(QuantModuleMixin):
    """Hugging Face Conv1D stores its weight as [in, out]."""

    def _to_2d(self, t):
        return t.t()

    def weight_from_2d(self, w2d):
        return w2d.t()

    def _float_forward(self, x, weight):
        out_shape = x.shape[:-1] + (weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight).reshape(out_shape)


class _DisabledQuantizer(TensorQuantizer):
    """Stand-in when a side (input or weight) is not quantized: always passes through."""

    def __init__(self, name: str):
        super().__init__(QuantizerSpec(), name)
        self.enabled = False

    def start_calibration(self):  # nothing to calibrate
        pass

    def finish_calibration(self, required: bool = True):
        pass

    def forward(self, x):
        return self._scaled(x)


def _quantizer(spec, name, is_weight):
    return TensorQuantizer(spec, name, is_weight) if spec is not None else _DisabledQuantizer(name)


_QUANT_CLASSES: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d,
                                     nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}


def quant_class_for(cls: type) -> type | None:
    """The fake-quant class for a float module class (subclasses included), or None."""
    if cls in _QUANT_CLASSES:
        return _QUANT_CLASSES[cls]
    for base, qbase in list(_QUANT_CLASSES.items()):
        if issubclass(cls, base):
            return _make_subclass(cls, qbase)
    if cls.__name__ == "Conv1D":  # Hugging Face GPT-2 style, weight [in, out]
        return _make_subclass(cls, _Conv1DOps)
    return None


def _make_subclass(cls: type, ops: type) -> type:
    qcls = type(f"Quant{cls.__name__}", (ops, cls), {})
    _QUANT_CLASSES[cls] = qcls
    return qcls


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantModuleMixin)


def wrap_module(module: nn.Module, weight_spec=None, input_spec=None, name: str = "") -> nn.Module:
    """Turn a float Linear / Conv1d / Conv2d / Conv3d / Hugging Face Conv1D into its
    fake-quant class in place and return it."""
    qcls = quant_class_for(type(module))
    if qcls is None:
        raise TypeError(f"{name or type(module).__name__}: {type(module).__name__} is not a "
                        "supported layer type (Linear, Conv1d, Conv2d, Conv3d, Hugging Face "
                        "Conv1D)")
    float_cls = type(module)
    module.__class__ = qcls
    _rebind_hooked_forward(module)
    module._float_cls = float_cls
    module._init_quantizers(weight_spec, input_spec, name)
    return module


def unwrap_module(module: nn.Module) -> nn.Module:
    """Undo :func:`wrap_module`: remove the quantizers and restore the float class."""
    if not is_quantized(module):
        return module
    module.__class__ = module._float_cls
    _rebind_hooked_forward(module)
    for attr in ("weight_quantizer", "input_quantizer", "_float_cls", "layer_name"):
        if hasattr(module, attr):
            delattr(module, attr)
    return module


def _rebind_hooked_forward(module: nn.Module) -> None:
    """After a class swap: a module with an accelerate hook (``device_map`` dispatch, CPU or
    disk offload) runs ``module._old_forward``, the bound ``forward`` of the class it had when
    the hook was added; point it at the new class's ``forward``, or the swap would not change
    what the module computes."""
    old = module.__dict__.get("_old_forward")
    if getattr(old, "__self__", None) is module:
        module._old_forward = type(module).forward.__get__(module)
