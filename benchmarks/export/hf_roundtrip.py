"""export_hf round trip on the embedded models: quantize, write a compressed-tensors folder, load
it back with transformers (compressed-tensors installed), and compare perplexity and logits.

    python benchmarks/export/hf_roundtrip.py [--models smollm2-135m gemma3-270m] [--windows 4]

A row per (model, preset): the fake-quant model's test perplexity, the reloaded folder's, the
largest logit difference between the two on the first window, the weights' bytes on disk
against the float model's safetensors, and the seconds export_hf took. Same calibration for
every row (``n_calib`` x 512 tokens of the calibration split, seed 0). Block 64 for
SmolLM2-135M (576-wide layers), 128 for Gemma-3-270M. Results: benchmarks/results/export_hf.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import modelopt_lite as mtl
from modelopt_lite.algorithms.smoothquant import SmoothQuantConfig
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.config import get_preset
from modelopt_lite.eval import perplexity
from modelopt_lite.export.hf import export_hf

RESULTS = Path(__file__).resolve().parents[1] / "results" / "export_hf.json"
BLOCK = {"gemma3-270m": 128, "smollm2-135m": 64}


def presets(block: int) -> dict:
    return {
        "int4_awq": get_preset("int4_awq", block_size=block),
        "w8a8": get_preset("w8a8"),
        # SmoothQuant as compressed-tensors holds it: no online rotation, no unfoldable multiply
        "int8_smoothquant(rotate=(), smooth_unfoldable=False)": get_preset(
            "int8_smoothquant").replace(algorithm=SmoothQuantConfig(rotate=(),
                                                                    smooth_unfoldable=False)),
    }


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--n-calib", type=int, default=16)
    args = ap.parse_args()
    test = wiki_text("test")
    rows = []
    for name in args.models:
        for label, cfg in presets(BLOCK[name]).items():
            model, tok = load_model(name)
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(f"{tmp}/float")
                float_bytes = _bytes(Path(f"{tmp}/float"))
                mtl.quantize(model, cfg, calib=[wiki_text("calibration")], tokenizer=tok,
                             n_samples=args.n_calib, seq_len=512, progress=False)
                start = time.perf_counter()
                folder = export_hf(model, f"{tmp}/hf", tokenizer=tok)
                seconds = time.perf_counter() - start
                loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
                ppl_fq = perplexity(model, tok, test, windows=args.windows, progress=False).ppl
                ppl_hf = perplexity(loaded, tok, test, windows=args.windows, progress=False).ppl
                ids = tok(test[:6000], return_tensors="pt").input_ids[:, :2048]
                with torch.no_grad():
                    diff = (model(ids).logits - loaded(ids).logits).abs().max().item()
                row = {"model": name, "preset": label, "ppl_fake_quant": round(ppl_fq, 4),
                       "ppl_reloaded": round(ppl_hf, 4), "max_abs_logit_diff": float(f"{diff:.3g}"),
                       "weights_bytes": _bytes(folder), "float_weights_bytes": float_bytes,
                       "export_s": round(seconds, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            _write(rows, args)   # after every row: a long run keeps what it measured


def _write(rows: list[dict], args) -> None:
    import compressed_tensors
    import transformers

    out = {"machine": f"CPU ({platform.machine()}), torch {torch.__version__}",
           "transformers": transformers.__version__,
           "compressed_tensors": compressed_tensors.__version__,
           "data": f"wikitext test split, first {args.windows} x 2048-token windows; "
                   f"calibration {args.n_calib} x 512 tokens",
           "date": datetime.date.today().isoformat(), "rows": rows}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
