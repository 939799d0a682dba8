"""``modelopt-lite export`` and ``modelopt-lite check`` (registered through ``COMMANDS``).

    modelopt-lite export --recipe w8a8 --out smollm2_w8a8.onnx
    modelopt-lite export --checkpoint out/ --out model.onnx --external-data
    modelopt-lite export --format hf --recipe int4_awq --out smollm2-awq/   # vLLM / transformers
    modelopt-lite check model.onnx            # exit 1 when TensorRT would reject a node
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _export_args(p: argparse.ArgumentParser) -> None:
    from ..cli import add_block_size

    p.add_argument("--model", default=None,
                   help="a registered model name (smollm2-135m, gemma3-270m) or a Hugging Face "
                        "folder; default: smollm2-135m, embedded")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="a modelopt_lite checkpoint folder (made by `quantize`) to export")
    src.add_argument("--recipe", default=None,
                     help="quantize first with this preset or config file (default: w8a8 for "
                          "ONNX, which must be symmetric for TensorRT; int4_awq with --format hf)")
    add_block_size(p)
    p.add_argument("--n-samples", type=int, default=16, help="calibration samples (recipe)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                   help="onnx: Q/DQ ONNX for TensorRT (default); hf: a Hugging Face folder in "
                        "the compressed-tensors format (vLLM, transformers)")
    p.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="--format hf: the dtype of the written float tensors and config "
                        "(default: the model's; the CLI calibrates in float32, so bfloat16 or "
                        "float16 is what a server wants)")
    p.add_argument("--out", default=None,
                   help="the ONNX file (default model.onnx) or, with --format hf, the folder "
                        "(default model-hf) to write")
    p.add_argument("--opset", type=int, default=None, help="default: 21 with INT4, else 19")
    p.add_argument("--external-data", action="store_true",
                   help="weights in <out>.data beside a small graph file")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of the written file against PyTorch (onnxruntime, or "
                        "with --format hf a transformers reload)")


def _quantized_model(args):
    import modelopt_lite as mtl
    from modelopt_lite.calib.embedded import DEFAULT_MODEL, load_model, wiki_text

    model, tokenizer = load_model(args.model or DEFAULT_MODEL)
    if args.recipe is None:
        args.recipe = "int4_awq" if getattr(args, "format", "onnx") == "hf" else "w8a8"
    if args.checkpoint:
        mtl.load(model, args.checkpoint)
    else:
        from ..cli import _recipe

        mtl.quantize(model, _recipe(model, args), calib=[wiki_text("calibration")],
                     tokenizer=tokenizer, n_samples=args.n_samples, seq_len=args.seq_len)
    return model, tokenizer


_SENTENCE = "The quick brown fox jumps over the lazy dog."


def _export_run(args) -> int:
    if args.format == "hf":
        return _export_hf_run(args)
    if args.save_dtype is not None:
        raise ValueError("--save-dtype is a --format hf option")
    from .onnx import export_onnx
    from .trt_check import format_findings, trt_check

    model, tokenizer = _quantized_model(args)
    ids = tokenizer(_SENTENCE, return_tensors="pt").input_ids
    result = export_onnx(model, ids, args.out or "model.onnx", opset=args.opset,
                         external_data=args.external_data)
    size = result.path.stat().st_size + (result.data_path.stat().st_size
                                         if result.data_path else 0)
    print(f"wrote {result.path} (opset {result.opset}, {result.qdq_nodes} Q/DQ nodes, "
          f"{size / 2**20:.1f} MiB) in {result.seconds:.1f} s")
    if not args.no_verify:
        from .verify import compare_with_torch

        err = compare_with_torch(model, ids, result.path)
        print(f"onnxruntime vs PyTorch logits: max abs {err['max_abs']:.3g}, "
              f"relative {err['rel']:.3g}")
    findings = trt_check(result.path)
    print(format_findings(findings, result.path))
    return 1 if findings else 0


def _export_hf_run(args) -> int:
    import torch

    from .hf import export_hf

    if args.opset is not None or args.external_data:
        raise ValueError("--opset and --external-data are ONNX options; --format hf takes "
                         "neither")
    model, tokenizer = _quantized_model(args)
    folder = export_hf(model, args.out or "model-hf", tokenizer=tokenizer,
                       dtype=args.save_dtype)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"wrote {folder} (compressed-tensors, {size / 2**20:.1f} MiB of weights)")
    if args.save_dtype is None and next(model.parameters()).dtype == torch.float32:
        print("note: written in float32; pass --save-dtype bfloat16 (or float16) for a server")
    if args.no_verify:
        return 0
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        print("not verified: loading it back needs the compressed-tensors package")
        return 0
    from transformers import AutoModelForCausalLM

    ids = tokenizer(_SENTENCE, return_tensors="pt").input_ids
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    except Exception as err:  # noqa: BLE001 - reported as the check's outcome
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"check failed: transformers could not load {folder} back: {line}")
        return 1
    with torch.no_grad():
        want, got = model(ids).logits.float(), loaded(ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"transformers (compressed-tensors) vs the fake-quant model, logits: relative {rel:.3g}")
    if rel > _HF_TOLERANCE:
        print(f"check failed: more than {_HF_TOLERANCE:g} (scales are stored in the model's "
              "dtype, which moves half-precision weights by a rounding step at most)")
        return 1
    return 0


_HF_TOLERANCE = 0.05


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an ONNX file")
    p.add_argument("--no-info", action="store_true", help="errors only (no 2:4 notes)")


def _check_run(args) -> int:
    from .trt_check import format_findings, trt_check

    if not Path(args.path).is_file():
        print(f"error: {args.path} is not a file")
        return 2
    from google.protobuf.message import DecodeError

    try:
        findings = trt_check(args.path, info=not args.no_info)
    except DecodeError as err:   # not an ONNX model at all: exit 2, not 1 ("TensorRT rejects")
        raise ValueError(f"{args.path} is not a readable ONNX model ({err})") from err
    print(format_findings(findings, args.path))
    return 1 if any(f.severity == "error" for f in findings) else 0


COMMANDS = {
    "export": ("export a quantized model to Q/DQ ONNX for TensorRT, or (--format hf) to a "
               "compressed-tensors Hugging Face folder", _export_args, _export_run),
    "check": ("list the nodes of an ONNX file TensorRT would reject or misread", _check_args,
              _check_run),
}
