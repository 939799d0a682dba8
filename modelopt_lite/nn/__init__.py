"""Fake-quant building blocks: TensorQuantizer and the quantized module wrappers."""

from .quant_modules import (QuantConv2d, QuantLinear, QuantModuleMixin, is_quantized,
                            unwrap_module, wrap_module)
from .tensor_quantizer import CalibrationError, TensorQuantizer

__all__ = ["TensorQuantizer", "CalibrationError", "QuantLinear", "QuantConv2d",
           "QuantModuleMixin", "wrap_module", "unwrap_module", "is_quantized"]
