"""``modelopt-lite sparsify``: 2:4-prune a model, save it, print dense vs sparse perplexity.

    modelopt-lite sparsify                                  # SmolLM2, SparseGPT, wiki calibration
    modelopt-lite sparsify --method magnitude --out sparse/
    modelopt-lite sparsify --then-quantize int8_smoothquant --out sparse_w8a8/
"""

from __future__ import annotations

import argparse
import time


def _args(p) -> None:
    from ..cli import _common, add_block_size

    _common(p)
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--method", default="sparsegpt", choices=("magnitude", "sparsegpt", "wanda"))
    p.add_argument("--calib", default="wiki",
                   help="'wiki' (the embedded Wikipedia calibration split) or a text file")
    p.add_argument("--n-samples", type=int, default=32,
                   help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per calibration sequence (default 512)")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="module-name patterns to leave dense (default: lm_head, embeddings)")
    p.add_argument("--then-quantize", default=None,
                   help="a quantization preset to apply after pruning (masks are kept)")
    add_block_size(p)
    p.add_argument("--out", default="modelopt_lite_sparse", help="checkpoint folder to write")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity table")


def _run(args) -> int:
    import modelopt_lite as mtl

    from ..cli import _calib_source, _load, _ppl, _recipe, _table, check_paths, skip_eval_unless_lm
    from . import format_sparsity, sparsify

    check_paths(args)
    model, tokenizer = _load(args)
    skip_eval_unless_lm(model, args)
    rows = [] if args.no_eval else [("dense", _ppl(model, tokenizer, args), "")]
    start = time.time()
    calib = None if args.method == "magnitude" else _calib_source(args)
    sparsify(model, args.pattern, method=args.method, calib=calib, tokenizer=tokenizer,
             n_samples=args.n_samples, seq_len=args.seq_len, exclude=args.exclude)
    note = f"pruned in {time.time() - start:.0f} s"
    print(format_sparsity(model))
    name = f"{args.pattern} {args.method}"
    if args.then_quantize:
        cfg = _recipe(model, argparse.Namespace(recipe=args.then_quantize,
                                                block_size=args.block_size))
        mtl.quantize(model, cfg, calib=_calib_source(args), tokenizer=tokenizer,
                     n_samples=args.n_samples, seq_len=args.seq_len)
        mtl.print_summary(model)
        name += f" + {args.then_quantize}"
    out = mtl.save(model, args.out)
    if not args.no_eval:
        rows.append((name, _ppl(model, tokenizer, args), note))
    _table(rows, args)
    print(f"saved to {out}")
    return 0


COMMANDS = {"sparsify": ("2:4-prune a model (magnitude, SparseGPT, Wanda), save it, print "
                         "dense vs sparse perplexity", _args, _run)}
