"""Hugging Face checkpoints in the compressed-tensors format (vLLM, transformers).

:func:`export_hf` writes a quantized Hugging Face model as a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` (with the ``compressed-tensors`` package)
and vLLM load as a quantized model: ``config.json`` with a ``quantization_config`` of
``quant_method: compressed-tensors``, and safetensors shards in which each quantized linear
holds integer codes and scales instead of its float weight:

- weight-only layers (``int4_awq``, ``int4_weight_only``, ``int8_weight_only``, ...):
  ``pack-quantized``: ``weight_packed`` (int32, eight 4-bit or four 8-bit codes per word along
  the input dim, element ``i`` at bits ``b*i``, codes offset to unsigned), ``weight_scale``
  (``[out, in / group]``, ``[out, 1]`` per channel, in the model's dtype, as the weight-only
  kernels read them), ``weight_zero_point`` (asymmetric only: integer zero points, packed the
  same way along the output dim) and ``weight_shape``;
- 8-bit weights with 8-bit activations (``w8a8``, ``int8_smoothquant`` and their dynamic
  variants): ``int-quantized``: ``weight`` as int8, ``weight_scale`` ``[out, 1]`` and, for
  static activation ranges, ``input_scale`` ``[1]``, both float32 as vLLM's INT8 path keeps
  them (dynamic activations are per token).

The codes are the ones the fake-quant model computes with (``W_hat = (q - z) * scale``), so a
float32 model reloads with its fake-quant weights exactly. Weight-only scales in a half-precision
model are rounded to its dtype (and transformers' loader rounds the W8A8 ones too), which moves
a weight by at most a rounding step. AWQ and SmoothQuant scales folded into norms and linears
are in the float weights already.

Example::

    model = mtl.quantize(model, "int4_awq", calib=texts, tokenizer=tokenizer)
    mtl.export_hf(model, "llama-awq/", tokenizer=tokenizer)
    # vllm serve llama-awq/    or    AutoModelForCausalLM.from_pretrained("llama-awq/")
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..layers import quant_modules
from ..nn import functional as F

logger = logging.getLogger(__name__)

_QUANTIZER_KEYS = (".weight_quantizer.", ".input_quantizer.", ".output_quantizer.")


class HFExportError(ValueError):
    """The model or one of its layers cannot be written in the compressed-tensors format."""


@dataclass(frozen=True)
class _Scheme:
    bits: int
    strategy: str             # "tensor" | "channel" | "group"
    group_size: int | None
    symmetric: bool
    activations: str | None   # None | "static" | "dynamic"

    @property
    def format(self) -> str:
        return "int-quantized" if self.activations else "pack-quantized"

    def to_dict(self, targets: list[str]) -> dict:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "group_size": self.group_size, "strategy": self.strategy,
                   "dynamic": False, "actorder": None, "observer": "minmax"}
        acts = None
        if self.activations:
            dynamic = self.activations == "dynamic"
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                    "strategy": "token" if dynamic else "tensor", "dynamic": dynamic,
                    "observer": None if dynamic else "minmax"}
        return {"targets": targets, "weights": weights, "input_activations": acts,
                "output_activations": None, "format": self.format}


def export_hf(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
              max_shard_size: str | int = "5GB", dtype: torch.dtype | str | None = None
              ) -> Path:
    """Write the fake-quant Hugging Face ``model`` to ``directory`` as a compressed-tensors
    checkpoint (see the module docstring); return the folder. ``tokenizer`` (or a processor)
    is saved beside it when given. ``dtype`` (``torch.bfloat16``, ``"float16"``, ...): the
    dtype of the written float tensors (embeddings, norms, float layers, weight-only scales)
    and of ``config.json``, for a model calibrated in float32 but served in half precision;
    None keeps the model's. Every check runs before anything is written; the model is not
    changed.

    Refused, with the layer and the fix: layers deployed as ``Int4Linear`` (export before
    ``deploy()``), quantized convolutions or Hugging Face ``Conv1D`` layers, asymmetric
    weights with fractional zero points (quantize with ``integer_zero=True``), an input
    multiply or rotation that was not folded into the model's weights, activation formats
    other than 8-bit symmetric per-tensor (static) or per-token (dynamic), layers created by
    modelopt_lite's rewrites (unfused MoE experts, unpacked ``nn.MultiheadAttention``) and
    offloaded (meta) weights.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise HFExportError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel "
                            "(no save_pretrained / config); use modelopt_lite.save, or "
                            "export_onnx for other models")
    unpacked = _unpacked_attention(model)
    _refuse_deployed_and_rewritten(model, unpacked)
    layers = quant_modules(model)
    if not layers:
        raise HFExportError("the model has no fake-quant layers: quantize it first "
                            "(modelopt_lite.quantize)")
    schemes: dict[_Scheme, list[str]] = {}
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in layers:
        scheme, tensors = _compress(name, module)
        schemes.setdefault(scheme, []).append(name)
        compressed[name] = {k: v.cpu() for k, v in tensors.items()}   # (off the GPU at once)
    untie = _tied_quantized(model, set(compressed))
    _warn_split_fusions(schemes, model)

    quantized = set(compressed)
    ignore = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n and n not in quantized
              and not _inside_unpacked(unpacked, n)]
    if len(schemes) == 1:   # one scheme: every Linear but the ignored ones
        groups = {"group_0": next(iter(schemes)).to_dict(["Linear"])}
    else:   # several (a per-channel fallback beside blocks): each layer by name
        groups = {f"group_{i}": s.to_dict(sorted(names))
                  for i, (s, names) in enumerate(schemes.items())}
    formats = {s.format for s in schemes}
    qconfig = {"quant_method": "compressed-tensors",
               "format": formats.pop() if len(formats) == 1 else "mixed-precision",
               "quantization_status": "compressed", "config_groups": groups,
               "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}

    state = {k: v for k, v in model.state_dict().items()
             if not any(s in k for s in _QUANTIZER_KEYS) and not k.endswith(".weight_mask")}
    state = _packed_attention_keys(unpacked, state)
    for name, tensors in compressed.items():
        state.pop(f"{name}.weight")
        state.update({f"{name}.{k}": v for k, v in tensors.items()})

    if dtype is not None:
        dtype = _dtype(dtype)
        keep = {f"{n}.{k}" for n, t in compressed.items() for k in t
                if k in ("input_scale", "weight_scale") and "weight" in t}   # W8A8: float32
        state = {k: v.to(dtype) if v.is_floating_point() and k not in keep else v
                 for k, v in state.items()}

    directory = Path(directory)
    # everything is written into a temporary folder beside the target first, then moved in:
    # a failure while writing (disk full, interrupted) leaves an earlier export intact
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    config = model.config
    model.config = copy.deepcopy(config)
    model.config.quantization_config = qconfig
    if untie:   # a quantized head beside its float embedding: no longer one tensor
        for c in {id(c): c for c in (model.config, _text_config(model.config))}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    try:
        model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        if dtype is not None:   # save_pretrained records the live model's dtype
            _set_config_dtype(staging / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _move_into(staging, directory)
    finally:
        model.config = config
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %d quantized layer(s) (%s) and %d float linear(s) to %s",
                len(quantized), ", ".join(sorted({s.format for s in schemes})), len(ignore),
                directory)
    return directory


def _move_into(staging: Path, directory: Path) -> None:
    """Move the written files into ``directory`` (created if needed), replacing files of the
    same name and removing the weight shards and index of an earlier export that the new one
    does not have; other files in the folder are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    new = {f.name for f in staging.iterdir()}
    for old in directory.glob("model*.safetensors*"):
        if old.name not in new:
            old.unlink()
    for f in staging.iterdir():
        os.replace(f, directory / f.name)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    import json

    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for c in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:
        c["dtype"] = name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise HFExportError(f"dtype {dtype!r}: the export writes float16, bfloat16 or float32")
    return dtype


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _tied_quantized(model: nn.Module, quantized: set[str]) -> bool:
    """Whether a quantized layer's weight is tied to another module's (a head tied to the
    embedding): the checkpoint then unties them, the embedding float, the head quantized, as
    the fake-quant model computes. A tie between two quantized layers, or any other tie with
    no ``tie_word_embeddings`` to turn off, is refused."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    untie = False
    for mods in owners.values():
        hit = [m for m in mods if m in quantized]
        if not hit or len(mods) == 1:
            continue
        tied_flag = any(getattr(c, "tie_word_embeddings", False)
                        for c in (model.config, _text_config(model.config)))
        if len(hit) > 1 or not tied_flag:
            others = ", ".join(m for m in mods if m != hit[0])
            raise HFExportError(f"{hit[0]}: its weight is shared with {others}; a checkpoint "
                                "cannot hold it quantized in one place and not in the other. "
                                "Exclude it from quantization to export")
        untie = True
        logger.warning("%s is quantized and tied to %s: the checkpoint unties them "
                       "(tie_word_embeddings=False), the embedding stays float", hit[0],
                       ", ".join(m for m in mods if m != hit[0]))
    return untie


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _warn_split_fusions(schemes: dict, model: nn.Module) -> None:
    """vLLM runs q/k/v (and gate/up) as one fused layer, which needs one scheme (or float) for
    every shard; transformers loads a split fine, so this warns."""
    scheme_of = {n: s for s, names in schemes.items() for n in names}
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for parent in {n.rpartition(".")[0] for n in names}:
        for family in _FUSED:
            shards = [f"{parent}.{p}" for p in family if f"{parent}.{p}" in names]
            if len(shards) > 1 and len({scheme_of.get(n) for n in shards}) > 1:
                logger.warning("%s: %s are quantized differently (or some are float); vLLM "
                               "fuses them into one layer and needs one scheme for all",
                               parent, ", ".join(p.rpartition(".")[2] for p in shards))
                return


def _inside_unpacked(unpacked: dict, name: str) -> bool:
    """A q/k/v linear of an unpacked attention (written back packed, not a module there)."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ("q_proj", "k_proj", "v_proj") and parent in unpacked


def _unpacked_attention(model: nn.Module) -> dict:
    """Name -> module of every unpacked ``nn.MultiheadAttention`` of ``model``."""
    from ..attention import LinearMultiheadAttention

    return {n: m for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention)}


def _packed_attention_keys(unpacked: dict, state: dict) -> dict:
    """An unpacked ``nn.MultiheadAttention`` whose linears stayed float (a vision tower's
    pooling head) is written under the model's own names: ``in_proj_weight`` (or the three
    ``*_proj_weight``), ``in_proj_bias``, ``out_proj.*``."""
    for name, attn in unpacked.items():
        q, k, v = (f"{name}.{p}_proj" for p in "qkv")
        if attn._packed._qkv_same_embed_dim:
            state[f"{name}.in_proj_weight"] = torch.cat([state.pop(f"{p}.weight")
                                                         for p in (q, k, v)])
        else:
            for p in (q, k, v):
                state[f"{p}_weight"] = state.pop(f"{p}.weight")
        if f"{q}.bias" in state:
            state[f"{name}.in_proj_bias"] = torch.cat([state.pop(f"{p}.bias")
                                                       for p in (q, k, v)])
    return state


def _refuse_deployed_and_rewritten(model: nn.Module, unpacked: dict) -> None:
    from ..moe import has_linear_experts
    from ..nn import is_quantized
    from ..nn.int4_linear import int4_layers

    deployed = list(int4_layers(model))
    if deployed:
        raise HFExportError(f"{deployed[0]} (and {len(deployed) - 1} more) was deployed as "
                            "packed Int4Linear; call export_hf before deploy() (or reload the "
                            "checkpoint with modelopt_lite.load)")
    if has_linear_experts(model):
        raise HFExportError(
            "this model's MoE experts were unfused into per-expert linears for quantization, "
            "names the Hugging Face model class does not have; export_hf does not write them "
            "back in the fused layout yet. Save with modelopt_lite.save instead")
    for name, attn in unpacked.items():
        if any(is_quantized(getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
            raise HFExportError(
                f"{name}: an nn.MultiheadAttention unpacked for quantization, with quantized "
                "projections; the Hugging Face model keeps q/k/v packed in in_proj_weight and "
                "reads out_proj's weight directly, which the format cannot hold quantized. "
                f"Exclude '{name}.*' to export, or save with modelopt_lite.save")


def _compress(name: str, module: nn.Module) -> tuple[_Scheme, dict[str, torch.Tensor]]:
    """The scheme and the compressed tensors of one fake-quant linear."""
    if not isinstance(module, nn.Linear):
        raise HFExportError(f"{name}: a quantized {type(module).__name__}; the "
                            "compressed-tensors export writes nn.Linear layers only. Exclude "
                            "it from quantization (QuantConfig(exclude=...)) to export")
    weight = module.weight.detach()
    if weight.is_meta:
        raise HFExportError(f"{name}: its weight is offloaded (meta); save with "
                            "modelopt_lite.save and load it into a model in memory first")
    wq, iq = module.weight_quantizer, getattr(module, "input_quantizer", None)
    if iq is not None and iq.rotation is not None:
        raise HFExportError(
            f"{name}: its input is rotated online (SmoothQuant's rotate, on by default for the "
            "output projections), which the compressed-tensors format does not carry. Fix: "
            "quantize with get_preset('int8_smoothquant').replace(algorithm=SmoothQuantConfig("
            "rotate=(), smooth_unfoldable=False)), or keep this model to modelopt_lite.save / "
            "export_onnx")
    if iq is not None and iq.pre_quant_scale is not None:
        raise HFExportError(
            f"{name}: its input is multiplied by a smoothing scale that no layer before it "
            "could take (SmoothQuant's smooth_unfoldable: o_proj under grouped-query attention; "
            "or an architecture without a row in modelopt_lite.models.ARCHITECTURES), and the "
            "compressed-tensors format has no such multiply. Fix: quantize with "
            "SmoothQuantConfig(rotate=(), smooth_unfoldable=False) or AWQConfig(fold_only=True) "
            "(such layers are then quantized unscaled), add the architecture's row, or exclude "
            "the layer")
    spec = wq.spec
    if not wq.enabled:
        raise HFExportError(f"{name}: its weights are not quantized (activations only); the "
                            "format stores quantized weights. Quantize the weights too, or "
                            "save with modelopt_lite.save")
    if spec.num_bits not in (4, 8):
        raise HFExportError(f"{name}: {spec.num_bits}-bit weights; the export writes 4- and "
                            "8-bit integer weights")
    # a per-tensor range is written per channel, every row with the same scale (exact; vLLM's
    # weight-only kernels take channel and group scales)
    strategy = "group" if spec.granularity == "per_block" else "channel"
    acts = _activations(name, iq)
    scale, zero = wq.scale_zero(weight)
    if spec.granularity == "per_tensor":
        rows = weight.shape[0]
        scale = scale.reshape(1, 1).expand(rows, 1)
        zero = None if zero is None else zero.reshape(1, 1).expand(rows, 1)
    blocks = F.to_blocks(weight, spec.block_size) if strategy == "group" else weight
    s = scale.unsqueeze(-1) if strategy == "group" else scale
    if zero is not None:
        if not torch.equal(zero, zero.round()):
            raise HFExportError(
                f"{name}: asymmetric weights with fractional zero points; the format stores "
                "integer zero points. Fix: quantize with integer zero points (QuantizerSpec(..., "
                "symmetric=False, integer_zero=True)) or symmetric weights (e.g. 'int4_awq')")
    z = None if zero is None else (zero.unsqueeze(-1) if strategy == "group" else zero)
    q = F.quantize(blocks, s, z, spec.num_bits, spec.symmetric).reshape(weight.shape)
    offset = 0 if spec.symmetric else 2 ** (spec.num_bits - 1)   # signed codes
    codes = (q - offset).to(torch.int8)
    dtype = weight.dtype if weight.is_floating_point() else torch.float16
    scale_t = scale.reshape(weight.shape[0], -1).to(dtype).contiguous()
    scheme = _Scheme(spec.num_bits, strategy, spec.block_size if strategy == "group" else None,
                     spec.symmetric, acts)
    if acts:   # int-quantized: int8 codes as they are
        if spec.num_bits != 8 or not spec.symmetric:
            kind = "symmetric" if spec.symmetric else "asymmetric"
            raise HFExportError(f"{name}: {spec.num_bits}-bit {kind} weights with 8-bit "
                                "activations; the export writes W8A8 with symmetric 8-bit "
                                "weights")
        # float32 scales, as vLLM's INT8 kernels keep them (and modelopt_lite computes with)
        out = {"weight": codes, "weight_scale": scale.reshape(weight.shape[0], -1).float()}
        if acts == "static":
            out["input_scale"] = iq.amax.float().reshape(1) / 127
        return scheme, out
    out = {"weight_packed": pack_int32(codes, spec.num_bits),
           "weight_scale": scale_t, "weight_shape": torch.tensor(list(weight.shape))}
    if zero is not None:
        zero_codes = (zero.reshape(weight.shape[0], -1) - offset).round().to(torch.int8)
        out["weight_zero_point"] = pack_int32(zero_codes.t().contiguous(), spec.num_bits).t() \
            .contiguous()
    return scheme, out


def _activations(name: str, iq) -> str | None:
    """None (weights only), "static" (per-tensor range) or "dynamic" (per token)."""
    if iq is None or not iq.enabled:
        return None
    s = iq.spec
    if s.num_bits == 8 and s.symmetric and s.dynamic and s.granularity == "per_token":
        return "dynamic"
    if (s.num_bits == 8 and s.symmetric and not s.dynamic and s.granularity == "per_tensor"
            and iq.amax is not None and iq.amax.numel() == 1):
        return "static"
    raise HFExportError(f"{name}: input quantizer {s.describe()}; the export writes 8-bit "
                        "symmetric activations, per tensor (static) or per token (dynamic)")


def pack_int32(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed ``num_bits`` codes (int8 ``[rows, cols]``) packed along ``cols`` into int32
    words, element ``i`` at bits ``num_bits * i`` of the row's bit stream (offset to unsigned
    by ``2**(num_bits - 1)``), as compressed-tensors stores them; 4 and 8 bits fill words
    exactly (8 or 4 codes a word), the row padded to whole words with zero codes."""
    per = 32 // num_bits
    u = (codes.to(torch.int64) + 2 ** (num_bits - 1)) & (2 ** num_bits - 1)
    rows, cols = u.shape
    pad = (-cols) % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, per)
    shifts = torch.arange(per, device=u.device, dtype=torch.int64) * num_bits
    words = (u << shifts).sum(-1)   # < 2**32: fits int64, then wraps into int32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
