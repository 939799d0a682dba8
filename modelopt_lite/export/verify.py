"""Run an exported file in onnxruntime (CPU) and compare it with the PyTorch fake-quant model.

``level="none"`` (the default) runs the graph as written, so differences are float round-off:
this is the check that the Q/DQ graph means what the fake-quant model computes.
``"basic"`` adds onnxruntime's own rewrites, among them quantizing Conv biases to int32
(``bias / (s_x * s_w)``, as TensorRT does), and ``"all"`` fuses Q/DQ into integer kernels
(``MatMulIntegerToFloat``, ``MatMulNBits`` with int8 activations; on CPUs without VNNI the
u8s8 kernels may saturate). Report those as what a runtime does, judge the export by
``"none"``.

Example::

    err = compare_with_torch(model, ids, "model.onnx")   # {'max_abs': ..., 'rel': ...}
"""

from __future__ import annotations

import numpy as np
import torch

from .onnx import is_causal_lm, prepare


def session(path, level: str = "none"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_feeds(sess, model, example_inputs) -> dict:
    _, args, kwargs, names, _ = prepare(model, example_inputs)
    given = dict(zip(names, list(args) + list(kwargs.values())))
    return {i.name: given[i.name].detach().cpu().numpy() for i in sess.get_inputs()}


def run_onnx(path, model, example_inputs, level: str = "none", sess=None) -> np.ndarray:
    sess = sess or session(path, level)
    return sess.run(None, onnx_feeds(sess, model, example_inputs))[0]


@torch.no_grad()
def run_torch(model, example_inputs) -> np.ndarray:
    module, args, kwargs, _, _ = prepare(model, example_inputs)
    out = module(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        out = out[0]
    return out.float().cpu().numpy()


def errors(out: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs": float(diff.max()),
            "rel": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
            "max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-30))}


def compare_with_torch(model, example_inputs, path, level: str = "none") -> dict:
    """Max abs error, relative L2 error and max error over max |ref| of ONNX vs PyTorch."""
    return errors(run_onnx(path, model, example_inputs, level), run_torch(model, example_inputs))


__all__ = ["session", "run_onnx", "run_torch", "errors", "compare_with_torch", "is_causal_lm"]
