"""modelopt_lite: post-training quantization and sparsity for PyTorch.

    import modelopt_lite as mtl
    model = mtl.quantize(model, "int4_weight_only", calib=texts, tokenizer=tokenizer)
    mtl.print_summary(model)
    mtl.save(model, "out/")

Heavy integrations (transformers, onnx, triton) are imported only where they are used.
"""

from __future__ import annotations

import importlib

from .api import deploy, quantize, unquantize
from .config import PRESETS, QuantConfig, QuantizerSpec, get_preset
from .io import load, save
from .summary import format_summary, print_summary

__version__ = "0.1.0"

_LAZY = {
    "perplexity": ("modelopt_lite.eval", "perplexity"),
    "export_onnx": ("modelopt_lite.export.onnx", "export_onnx"),
    "trt_check": ("modelopt_lite.export.trt_check", "trt_check"),
    "export_hf": ("modelopt_lite.export.hf", "export_hf"),
    "sparsify": ("modelopt_lite.sparsity", "sparsify"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'modelopt_lite' has no attribute {name!r}")


__all__ = ["quantize", "unquantize", "deploy", "print_summary", "format_summary", "save",
           "load", "QuantConfig", "QuantizerSpec", "PRESETS", "get_preset", *_LAZY]
