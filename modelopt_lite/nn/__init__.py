"""Fake-quant building blocks: TensorQuantizer and the quantized module wrappers."""

from .quant_modules import (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear,
                            QuantModuleMixin, is_quant_conv, is_quantized, unwrap_module,
                            wrap_module)
from .tensor_quantizer import CalibrationError, TensorQuantizer

__all__ = ["TensorQuantizer", "CalibrationError", "QuantLinear", "QuantConv1d", "QuantConv2d",
           "QuantConv3d", "QuantModuleMixin", "wrap_module", "unwrap_module", "is_quantized",
           "is_quant_conv"]
