"""quantize() on a tiny random model of every causal-LM (or image-text-to-text, seq2seq,
encoder-only text-classification or image-classification) architecture transformers knows.

Each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (``--task image-text-to-text``:
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, text calibration, the row also names the decoder
stack found and how many layers of other inputs stayed in float) is built from its default config
with small sizes (2 layers, hidden 128, 4 experts for MoE models, the same for a multimodal
model's text and vision configs; types whose configs do not take these fields fail to build or
stay too large and are listed as such; matrices initialised to zero drawn at random), then
quantized with each preset on random calibration tokens. A row: the type, the preset, ``ok`` or
the error (types whose float model does not build or run with the small sizes: ``not built``),
the number of quantized layers and the relative logits error against the float model (random
weights: a smoke figure, not an accuracy one). ``--roundtrip`` adds save -> load and deploy(),
``--export`` the Q/DQ ONNX export checked in onnxruntime and by ``trt_check``, ``--hf`` the
compressed-tensors folder of ``export_hf`` loaded back with transformers.
Results: JSON with the machine, the transformers version and the date.

    python benchmarks/robustness/arch_sweep.py --out benchmarks/results/arch_sweep_cpu.json
    python benchmarks/robustness/arch_sweep.py --task image-text-to-text \
        --out benchmarks/results/arch_sweep_vlm_cpu.json
    python benchmarks/robustness/arch_sweep.py --presets w8a8,int4_awq --export \
        --out benchmarks/results/arch_sweep_export_cpu.json
    python benchmarks/robustness/arch_sweep.py --task text-classification --export \
        --out benchmarks/results/arch_sweep_encoders_cpu.json
    python benchmarks/robustness/arch_sweep.py --task image-classification --export \
        --out benchmarks/results/arch_sweep_vision_cpu.json
    python benchmarks/robustness/arch_sweep.py --task ctc --export \
        --out benchmarks/results/arch_sweep_speech_cpu.json
    python benchmarks/robustness/arch_sweep.py --presets int4_awq+fold_only,w8a8 --hf \
        --out benchmarks/results/arch_sweep_hf_cpu.json

``text-classification``, ``image-classification`` and ``ctc`` calibrate on random token ids,
random 32 x 32 images and random 0.1 s waveforms (``calib=`` takes the tensors as they are).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import signal
import sys
import tempfile
import traceback
import warnings

import torch

SIZES = dict(vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             max_position_embeddings=256, shared_expert_intermediate_size=128, n_group=1,
             topk_group=1, n_embd=128, n_layer=2, n_head=4, d_model=128, num_layers=2,
             ffn_dim=256, n_positions=256)
# the encoder-only, image and speech tasks also take these (the generative sweeps do not:
# their committed results were made without them)
ENCODER_SIZES = dict(image_size=32, patch_size=8, num_channels=3, embed_dim=64,
                     pooler_hidden_size=128, embedding_size=128)
ENCODER_TASKS = ("text-classification", "image-classification", "ctc")


AUDIO_SIZES = dict(conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                   num_feat_extract_layers=2, num_conv_pos_embeddings=16, vocab_size=32)


class _Timeout(Exception):
    pass


SUBCONFIGS = ("text_config", "vision_config", "audio_config", "perceiver_config",
              "qformer_config", "vq_config")


def _auto(task: str):
    from transformers import (AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForImageTextToText, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)
    from transformers.models.auto import modeling_auto as ma

    if task == "causal-lm":
        return AutoModelForCausalLM, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if task == "seq2seq":
        return AutoModelForSeq2SeqLM, ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if task == "text-classification":   # encoder-only: masked-LM types (BERT's family,
        # which also has a causal head) and those with no generative head at all
        causal, masked = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        return AutoModelForSequenceClassification, {
            k: v for k, v in ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items()
            if (k in masked or k not in causal)
            and k not in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    if task == "image-classification":
        return AutoModelForImageClassification, ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if task == "ctc":   # speech recognition on raw waveforms (wav2vec2's family)
        from transformers import AutoModelForCTC

        return AutoModelForCTC, ma.MODEL_FOR_CTC_MAPPING_NAMES
    return AutoModelForImageTextToText, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _inputs(task: str):
    """(example inputs, calibration data): token ids, or 32 x 32 images for image models."""
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    if task == "image-classification":
        return torch.randn(2, 3, 32, 32, generator=g1), torch.randn(4, 3, 32, 32, generator=g2)
    if task == "ctc":   # 0.1 s of 16 kHz audio
        return torch.randn(2, 1600, generator=g1), torch.randn(4, 1600, generator=g2)
    return (torch.randint(3, 120, (2, 16), generator=g1),
            torch.randint(3, 120, (4, 32), generator=g2))


def _logits(model, ids):
    from modelopt_lite.calib.runner import decoder_inputs

    with torch.no_grad():   # an encoder-decoder's decoder reads the text shifted right
        return model(ids, **decoder_inputs(model, ids)).logits.float()


def _build(model_type: str, max_params: float, task: str = "causal-lm"):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    for sub in [cfg] + [getattr(cfg, a) for a in SUBCONFIGS if getattr(cfg, a, None) is not None]:
        staged = task == "image-classification" and isinstance(getattr(sub, "depths", None),
                                                                 (list, tuple))
        sizes = SIZES | ENCODER_SIZES if task in ENCODER_TASKS else SIZES
        for key, value in sizes.items():
            if not hasattr(sub, key):
                continue
            # image models: a field that is a list per stage (PVT's heads, CvT's widths) keeps
            # its value, as do a model's hidden size where per-stage widths size it (ConvNeXt)
            # and its stage count (num_hidden_layers is an alias of it)
            if task == "image-classification" and (
                    isinstance(getattr(sub, key), (list, tuple))
                    or (key == "hidden_size" and getattr(sub, "hidden_sizes", None))
                    or (key == "num_hidden_layers" and staged)):
                continue
            setattr(sub, key, value)
        if staged:   # one block a stage
            sub.depths = [1] * len(sub.depths)
        if task == "ctc":   # a 2-convolution feature encoder (stride 10), 32 channels
            for key, value in AUDIO_SIZES.items():
                if hasattr(sub, key):
                    setattr(sub, key, value)
        layer_types = getattr(sub, "layer_types", None)   # one entry per layer: as many
        if isinstance(layer_types, list) and isinstance(getattr(sub, "num_hidden_layers", None),
                                                        int):   # as the small size has
            sub.layer_types = (layer_types * sub.num_hidden_layers)[:sub.num_hidden_layers]
        if getattr(sub, "qk_rope_head_dim", None):   # latent attention: rope dims set the heads
            sub.head_dim = sub.qk_rope_head_dim
        if getattr(sub, "pad_token_id", None) is not None and sub.pad_token_id >= 128:
            sub.pad_token_id = 0
        rope = getattr(sub, "rope_parameters", None)
        if isinstance(rope, dict) and "mrope_section" in rope:   # 3-D rope: head_dim / 2 split
            rope["mrope_section"] = [4, 6, 6]
    with torch.device("meta"):
        n = sum(p.numel() for p in _auto(task)[0].from_config(cfg).parameters())
    if n > max_params:
        raise ValueError(f"{n / 1e6:.0f}M parameters with the small sizes")
    return cfg


def _no_zero_matrices(model):
    """Matrices a config initialises to zero (Afmoe's router) drawn at random instead, as a
    trained checkpoint's are: all-equal router scores tie in top-k, and onnxruntime breaks
    the ties otherwise than PyTorch."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.is_floating_point() and not p.any():
                p.normal_(0, 0.02)
    return model


def _rel(a, b) -> float:
    return float(f"{((a - b).norm() / b.norm()).item():.3g}")


def _float_export(float_model, ids, folder) -> str:
    """Whether the float model itself goes through torch.onnx.export (dynamo), as a quantized
    one's export failure is read: "ok", or the root error."""
    from modelopt_lite.export.onnx import prepare

    module, args, kwargs, names, _ = prepare(float_model, ids)
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, input_names=names,
                              f=f"{folder}/float.onnx")
        return "ok"
    except Exception as err:  # noqa: BLE001 - recorded in the row
        while err.__cause__ is not None:
            err = err.__cause__
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"


def _export(model, ids, float_model) -> dict:
    """Q/DQ ONNX of the quantized model: onnxruntime vs PyTorch, trt_check, symbolic axes; on
    failure, the error and whether the float model exports at all."""
    from modelopt_lite.export import compare_with_torch, export_onnx, trt_check

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/model.onnx"
        try:
            export_onnx(model, ids, path)
        except Exception as err:  # noqa: BLE001 - recorded in the row, the sweep goes on
            return {"export": f"{type(err).__name__}: {str(err).strip()[:300]}",
                    "float_export": _float_export(float_model, ids, folder)}
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in graph.input}
        return {"export": "ok", "onnx_rel_err": _rel_np(compare_with_torch(model, ids, path)),
                "trt_check_problems": len(trt_check(path)), "onnx_inputs": dims}


def _rel_np(err: dict) -> float:
    return float(f"{err['rel']:.3g}")


def _preset(name: str):
    """A preset name, or ``name+fold_only`` for AWQ with ``AWQConfig(fold_only=True)``."""
    import dataclasses

    from modelopt_lite.config import get_preset

    base, _, option = name.partition("+")
    if not option:
        return base
    cfg = get_preset(base)
    return cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, **{option: True}))


def _hf_export(model, ids, out, auto) -> dict:
    """export_hf of the quantized model, loaded back with transformers (compressed-tensors):
    the relative logits change, or the refusal / load error."""
    from modelopt_lite.export.hf import export_hf

    with tempfile.TemporaryDirectory() as folder:
        try:
            export_hf(model, folder)
        except Exception as err:  # noqa: BLE001 - recorded in the row, the sweep goes on
            return {"hf_export": f"{type(err).__name__}: {str(err).strip()[:200]}"}
        try:
            loaded = auto.from_pretrained(folder).eval()
            return {"hf_export": "ok", "hf_rel_err": _rel(_logits(loaded, ids), out)}
        except Exception as err:  # noqa: BLE001
            return {"hf_export": "written", "hf_load": f"{type(err).__name__}: "
                                                       f"{str(err).strip()[:200]}"}


def _one(model_type, cfg, state, preset, ids, calib, task="causal-lm", roundtrip=False,
         export=False, hf=False):
    import modelopt_lite as mtl
    from modelopt_lite.models import find_decoder_layers, layer_stacks

    auto = _auto(task)[0]
    model = auto.from_config(cfg).eval()
    model.load_state_dict(state)
    ref = _logits(model, ids)
    mtl.quantize(model, _preset(preset), calib=calib, progress=False)
    out = _logits(model, ids)
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite logits after quantize")
    row = dict(quantized_layers=len(mtl.layers.quant_modules(model)),
               rel_logits_err=round(_rel(out, ref), 4))
    if hf:
        row.update(_hf_export(model, ids, out, auto))
    if export:
        fresh = auto.from_config(cfg).eval()
        fresh.load_state_dict(state)
        row.update(_export(model, ids, fresh))
    if task == "seq2seq":
        row["layer_stacks"] = [path for path, _ in layer_stacks(model)]
    if roundtrip:   # mtl.save -> mtl.load into a fresh float model; deploy() for INT4
        with tempfile.TemporaryDirectory() as folder:
            mtl.save(model, folder)
            fresh = auto.from_config(cfg).eval()
            fresh.load_state_dict(state)
            mtl.load(fresh, folder)
            row["load_rel_err"] = _rel(_logits(fresh, ids), out)
        if "int4" in preset:
            mtl.deploy(model)
            row["deploy_rel_err"] = _rel(_logits(model, ids), out)
    if task == "image-text-to-text":
        row.update(decoder_layers=find_decoder_layers(model)[0], other_inputs_in_float=sum(
            "of a multimodal model" in (r["skipped"] or "")
            for r in model._modelopt_lite["layers"]))
    return row


def main() -> None:
    from transformers import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="int4_awq,int8_smoothquant,w8a8")
    ap.add_argument("--types", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--max-params", type=float, default=40e6)
    ap.add_argument("--timeout", type=int, default=120, help="seconds per quantize")
    ap.add_argument("--task", default="causal-lm",
                    choices=("causal-lm", "image-text-to-text", "seq2seq", "text-classification",
                             "image-classification", "ctc"))
    ap.add_argument("--roundtrip", action="store_true",
                    help="also save -> load into a fresh model, and deploy() INT4 presets; the "
                         "rows get the relative logits change of each")
    ap.add_argument("--export", action="store_true",
                    help="also export each quantized model to Q/DQ ONNX; the rows get the "
                         "onnxruntime-vs-PyTorch relative error, trt_check's problem count and "
                         "the graph's input axes, or the export error")
    ap.add_argument("--hf", action="store_true",
                    help="also write each quantized model with export_hf (compressed-tensors) "
                         "and load it back with transformers; the rows get the relative logits "
                         "change, or the refusal or load error")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(_Timeout()))
    auto, names = _auto(args.task)
    types = args.types.split(",") if args.types else sorted(names)
    rows = []
    for t in types:
        ids, calib = _inputs(args.task)
        try:
            cfg = _build(t, args.max_params, args.task)
            torch.manual_seed(0)
            float_model = _no_zero_matrices(auto.from_config(cfg).eval())
            with torch.no_grad():   # the float model must run with the small sizes
                if not torch.isfinite(_logits(float_model, ids)).all():
                    raise FloatingPointError("non-finite float logits")
            state = float_model.state_dict()
        except Exception as err:  # noqa: BLE001 - the config does not take the small sizes
            rows.append({"model_type": t, "preset": None, "status": "not built",
                         "error": f"{type(err).__name__}: {str(err)[:160]}"})
            print(f"{t:30s} not built: {type(err).__name__}", flush=True)
            continue
        for preset in args.presets.split(","):
            row = {"model_type": t, "preset": preset}
            signal.alarm(args.timeout)
            try:
                row.update(status="ok", **_one(t, cfg, state, preset, ids, calib, args.task,
                                               args.roundtrip, args.export, args.hf))
            except _Timeout:
                row.update(status="timeout")
            except Exception as err:  # noqa: BLE001 - a row per failure, the sweep goes on
                where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                         for f in traceback.extract_tb(err.__traceback__)][-1:]
                row.update(status="failed", error=f"{type(err).__name__} at {where}: "
                                                  f"{str(err)[:200]}")
            finally:
                signal.alarm(0)
            rows.append(row)
            print(f"{t:30s} {preset:18s} {row['status']} {row.get('export', '')}"
                  f"{row.get('hf_export', '')} {row.get('hf_rel_err', '')}", flush=True)
    built = [r for r in rows if r["preset"]]
    summary = {"types": len(types), "built": len({r["model_type"] for r in built}),
               "runs": len(built), "ok": sum(r["status"] == "ok" for r in built)}
    if args.export:
        summary["exported"] = sum(r.get("export") == "ok" for r in built)
    if args.hf:
        summary["hf_reloaded"] = sum(r.get("hf_export") == "ok" for r in built)
    print(json.dumps(summary), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"CPU ({platform.processor() or platform.machine()}), "
                                  f"torch {torch.__version__}", "task": args.task,
                       "roundtrip": args.roundtrip, "export": args.export, "hf": args.hf,
                       "transformers": __version__, "date": str(datetime.date.today()),
                       "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
