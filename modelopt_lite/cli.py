"""The ``modelopt-lite`` command line.

    modelopt-lite quantize                      # default model + Wikipedia calibration split
    modelopt-lite quantize --model ./my-hf-folder --recipe int8_smoothquant --out out/
    modelopt-lite eval --checkpoint out/        # perplexity, float vs quantized

Subcommands register themselves in ``COMMANDS`` (name -> (add_arguments, run)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from .nn.tensor_quantizer import CalibrationError

COMMANDS: dict = {}
AUTO_BLOCKS = (128, 64, 32)


def command(name: str, help: str):
    def wrap(fns):
        COMMANDS[name] = (help, *fns)
        return fns

    return wrap


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a registered model name (smollm2-135m, gemma3-270m) or a Hugging Face "
                        "folder; default: smollm2-135m, embedded")
    p.add_argument("--windows", type=int, default=4,
                   help="test windows of --seq-len-eval tokens for perplexity (default 4)")
    p.add_argument("--seq-len-eval", type=int, default=2048,
                   help="tokens per perplexity window (default 2048)")
    p.add_argument("--eval-text", default=None,
                   help="a text file to measure perplexity on (default: the embedded Wikipedia "
                        "test split)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="where the model's weights go, as Hugging Face's device_map: 'cuda', "
                        "'cuda:1', 'auto' (GPUs first, then CPU memory, then disk; offloaded "
                        "layers are calibrated one at a time on the GPU), or a JSON object of "
                        "module -> device; default: all in CPU memory")
    p.add_argument("--max-memory", default=None, metavar="JSON",
                   help="with --device-map auto: a cap per device, e.g. "
                        "'{\"0\": \"20GiB\", \"cpu\": \"64GiB\"}'")
    p.add_argument("--offload-folder", default=None,
                   help="where --device-map puts weights it offloads to disk (default: a "
                        "temporary folder under $TMPDIR, removed at exit; point it at a real "
                        "disk if /tmp is memory-backed)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="the float model's dtype (default float32; float16 or bfloat16 halve "
                        "the memory, on a GPU)")


def _load(args):
    import torch

    from .calib.embedded import DEFAULT_MODEL, load_model

    placement = {}
    if getattr(args, "device_map", None):
        device_map = _json_or_text(args.device_map, "--device-map")
        placement["device_map"] = int(device_map) if str(device_map).isdigit() else device_map
        if args.max_memory:
            placement["max_memory"] = _json_or_text(args.max_memory, "--max-memory")
            if not isinstance(placement["max_memory"], dict):
                raise SystemExit(f"--max-memory takes a JSON object of device -> size, e.g. "
                                 f"'{{\"0\": \"20GiB\", \"cpu\": \"64GiB\"}}', got "
                                 f"{args.max_memory!r}")
        placement["offload_folder"] = args.offload_folder
    elif getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
        raise SystemExit("--max-memory and --offload-folder place weights of --device-map; "
                         "give --device-map auto (or a map) too")
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    return load_model(args.model or DEFAULT_MODEL, dtype=dtype, **placement)


def _json_or_text(value: str, flag: str):
    """A JSON object given on the command line (keys like "0" become GPU indices), or the
    text as it is ('auto', 'cuda')."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{flag}: not valid JSON ({err.msg} at column {err.colno}): "
                         f"{value}") from None
    return {int(k) if k.isdigit() else k: v for k, v in parsed.items()}


def _ppl(model, tokenizer, args) -> float:
    from .calib.embedded import wiki_text
    from .eval import perplexity

    text = Path(args.eval_text).read_text() if args.eval_text else wiki_text("test")
    return perplexity(model, tokenizer, text, seq_len=args.seq_len_eval,
                      windows=args.windows).ppl


def _auto_block(model, cfg) -> int:
    """Largest block in AUTO_BLOCKS dividing the most targeted layers' input dims."""
    from .layers import _weight_2d_shape, plan_layers
    from .attention import unpack_attention
    from .moe import unfuse_experts

    unfuse_experts(model)   # MoE experts and attention projections count too (quantize()
    unpack_attention(model)   # would rewrite them anyway)
    dims = [_weight_2d_shape(p.module)[1] for p in plan_layers(model, cfg)]
    return max(AUTO_BLOCKS, key=lambda b: (sum(d % b == 0 for d in dims), b))


def _recipe(model, args):
    """The QuantConfig of ``--recipe`` with ``--set`` and ``--block-size`` applied. The block
    size: a number, or ``auto`` (the default for presets; a recipe file keeps its own unless
    ``--block-size`` is given)."""
    from .config import PRESETS, ConfigError, parse_overrides, resolve_config

    cfg = resolve_config(args.recipe)
    if getattr(args, "set", None):
        if cfg.algorithm is None or not dataclasses.fields(cfg.algorithm):
            raise ConfigError(f"--set: recipe {args.recipe!r} has no algorithm settings (its "
                              f"algorithm is {getattr(cfg.algorithm, 'name', None)!r})")
        cfg = cfg.replace(algorithm=dataclasses.replace(
            cfg.algorithm, **parse_overrides(type(cfg.algorithm), args.set)))
    block_size = getattr(args, "block_size", None)
    w = cfg.weight
    per_block = w is not None and w.granularity == "per_block"
    if block_size is None:
        if not per_block or str(args.recipe) not in PRESETS:
            return cfg
        block_size = "auto"
    elif not per_block:
        raise ConfigError(f"--block-size {block_size}: recipe {args.recipe!r} quantizes weights "
                          f"{w.granularity if w else 'not at all'}, not per block; drop the option "
                          "or pick an INT4 block recipe")
    block = _auto_block(model, cfg) if block_size == "auto" else block_size
    return cfg.replace(weight=dataclasses.replace(w, block_size=block))


def block_size_arg(value: str):
    """``--block-size``: 'auto' or a positive integer (argparse type)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a block size such as 128, "
                                         f"got {value!r}")
    return int(value)


def add_block_size(p) -> None:
    p.add_argument("--block-size", default=None, type=block_size_arg,
                   help="the INT4 block size: a number, or 'auto' (the largest of 128/64/32 "
                        "that fits the model's layers); default: auto for presets, the file's "
                        "own for a recipe file")


def _calib_source(args):
    if args.calib == "wiki":
        from .calib.embedded import wiki_text

        return [wiki_text("calibration")]
    return Path(args.calib)


def _quantize_args(p):
    _common(p)
    p.add_argument("--recipe", default="int4_awq",
                   help="preset name or JSON/YAML config file (default int4_awq)")
    add_block_size(p)
    p.add_argument("--calib", default="wiki",
                   help="'wiki' (the embedded Wikipedia calibration split) or a text file")
    p.add_argument("--n-samples", type=int, default=32,
                   help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per calibration sequence (default 512)")
    p.add_argument("--out", default="modelopt_lite_out", help="checkpoint folder to write")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity table")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override the recipe's algorithm settings, e.g. 'gptq=false' (AWQ / "
                        "SmoothQuant rounding to nearest) or 'alpha=0.8' (fixed SmoothQuant "
                        "alpha)")


def check_paths(args) -> None:
    """Input files that must exist and an output folder that can be one, checked before the
    model loads, so that a typo fails in a second, not after calibration."""
    for opt in ("calib", "eval_text"):
        value = getattr(args, opt, None)
        if value and value != "wiki" and not Path(value).is_file():
            raise FileNotFoundError(f"--{opt.replace('_', '-')} {value}: no such file")
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out}: a file is there; the output is a checkpoint folder")


def skip_eval_unless_lm(model, args) -> None:
    """Turn the perplexity table off, saying why, for a model perplexity() does not
    measure (an encoder-decoder, a classifier)."""
    from .eval import not_a_language_model

    kind = None if args.no_eval else not_a_language_model(model)
    if kind:
        print(f"{type(model).__name__} is {kind}: no perplexity table (measure it on its "
              f"task)")
        args.no_eval = True


def _quantize_run(args) -> int:
    import modelopt_lite as mtl

    check_paths(args)
    model, tokenizer = _load(args)
    cfg = _recipe(model, args)
    skip_eval_unless_lm(model, args)
    fp = None if args.no_eval else _ppl(model, tokenizer, args)
    start = time.time()
    mtl.quantize(model, cfg, calib=_calib_source(args), tokenizer=tokenizer,
                 n_samples=args.n_samples, seq_len=args.seq_len)
    calib_s = time.time() - start
    mtl.print_summary(model)
    out = mtl.save(model, args.out)
    rows = [("float", fp, "")] if fp is not None else []
    if not args.no_eval:
        rows.append((args.recipe, _ppl(model, tokenizer, args), f"calibrated in {calib_s:.0f} s"))
    _table(rows, args)
    print(f"saved to {out}")
    return 0


def _table(rows, args) -> None:
    if not rows:
        return
    source = args.eval_text or "Wikipedia test split"
    print(f"\nperplexity, {source}, {args.windows} x {args.seq_len_eval} tokens")
    print(f"{'model':<24} {'ppl':>8}  note")
    for name, ppl, note in rows:
        print(f"{name:<24} {ppl:8.3f}  {note}")


def _eval_args(p):
    _common(p)
    p.add_argument("--checkpoint", default=None,
                   help="a modelopt_lite checkpoint folder to compare against the float model")


def _eval_run(args) -> int:
    import modelopt_lite as mtl

    check_paths(args)
    model, tokenizer = _load(args)
    rows = [("float", _ppl(model, tokenizer, args), "")]
    if args.checkpoint:
        mtl.load(model, args.checkpoint)
        rows.append((str(args.checkpoint), _ppl(model, tokenizer, args), ""))
    _table(rows, args)
    return 0


command("quantize", "quantize a model, save it, print float vs quantized perplexity")(
    (_quantize_args, _quantize_run))
command("eval", "perplexity on the Wikipedia test split (float, and a checkpoint)")(
    (_eval_args, _eval_run))


def _load_plugins() -> None:
    """Subcommands that live beside their feature register when imported."""
    import importlib

    for mod in ("modelopt_lite.export.cli", "modelopt_lite.sparsity.cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
            continue
        for name, entry in getattr(module, "COMMANDS", {}).items():
            COMMANDS.setdefault(name, entry)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="modelopt-lite",
        description="Post-training quantization and 2:4 sparsity for PyTorch / Hugging Face "
                    "models: calibrate, quantize, evaluate, export to ONNX.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress, and show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["quantize"])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args._run(args)
    except _USER_ERRORS as err:   # bad input: one line and exit 2 (-v for the traceback)
        if args.verbose:
            raise
        print(f"modelopt-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


# what a user's input can cause (configs, paths, data, models, layers; the project's error
# types derive from ValueError), as opposed to a bug, which keeps its traceback
_USER_ERRORS = (ValueError, OSError, ImportError, CalibrationError)


if __name__ == "__main__":
    sys.exit(main())
