"""Q/DQ ONNX export for TensorRT (:func:`export_onnx`) and a TensorRT rules check (:func:`trt_check`).

``import modelopt_lite`` does not load this package; it (and onnx) loads on first use.
"""

from __future__ import annotations

from .onnx import ExportResult, export_onnx
from .qdq_patterns import ExportError
from .trt_check import Finding, format_findings, trt_check
from .verify import compare_with_torch

__all__ = ["export_onnx", "ExportResult", "ExportError", "trt_check", "Finding",
           "format_findings", "compare_with_torch"]
