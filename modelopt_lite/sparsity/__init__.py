"""2:4 (N:M) structured sparsity: magnitude, Wanda and SparseGPT masks kept as artefacts.

Every selected Linear / Conv1D / Conv1d / Conv2d / Conv3d gets a ``weight_mask`` buffer (bool,
the weight's shape) and its pruned weights set to zero; the masks save and load with the
checkpoint, the training plugins re-apply them after optimizer steps, and fake-quant layers
multiply their quantized weight by them, so zeros stay zero through quantization.

Example::

    import modelopt_lite as mtl
    model = mtl.sparsify(model, "2:4", method="sparsegpt", calib=texts, tokenizer=tokenizer)
    mtl.save(model, "out/")
"""

from __future__ import annotations

import contextlib
import logging
import time

from torch import nn

from ..calib.offload import at_hand, offload_store, offloaded_streaming
from ..calib.runner import resolve_forward_loop
from ..moe import all_experts_calibrate
from ..rewrites import flags, rewrite, undo
from .masks import SparsityPatternError, is_nm_sparse, nm_fraction, nm_mask
from .prune import CALIBRATED, SparsePlan, SparsityConfig, plan_sparsity, prune_magnitude, prune_plans
from .sparsegpt import HessianAccumulator, sparsegpt_prune

logger = logging.getLogger(__name__)


def sparsify(model: nn.Module, pattern: str = "2:4", method: str = "magnitude", *, calib=None,
             forward_loop=None, tokenizer=None, n_samples: int = 32, seq_len: int = 512,
             batch_size: int = 1, seed: int = 0, targets=("*",), exclude=None,
             on_indivisible: str = "skip", block_size: int = 128, percdamp: float = 0.01,
             progress: bool = True) -> nn.Module:
    """Prune ``model`` in place to the N:M ``pattern`` and return it.

    ``method``: ``"magnitude"`` (no data), ``"wanda"`` (``|W| * ||X||``) or ``"sparsegpt"``
    (OBS updates from the layer Hessian). Calibrated methods need ``calib`` (strings with
    ``tokenizer``, a text file, a dataset, a token tensor) or ``forward_loop(model)``.
    ``targets`` / ``exclude``: fnmatch patterns over module names, as in ``QuantConfig``
    (``lm_head``, embeddings and MoE routers are excluded by default). A layer whose input
    dim is not a multiple of M is skipped and listed (an error when named in ``targets`` or
    with ``on_indivisible="error"``).
    """
    from ..config import DEFAULT_EXCLUDE

    cfg = SparsityConfig(pattern, method, tuple(targets), tuple(exclude or DEFAULT_EXCLUDE),
                         on_indivisible=on_indivisible, block_size=block_size, percdamp=percdamp)
    offloaded = offload_store(model)   # accelerate's CPU / disk offload, checked first
    rewritten = rewrite(model)   # fused MoE experts, nn.MultiheadAttention -> nn.Linear
    try:
        plans = plan_sparsity(model, cfg)
        loop = resolve_forward_loop(model, calib, forward_loop, tokenizer, n_samples, seq_len,
                                    batch_size, seed, progress)
        if method in CALIBRATED and loop is None:
            raise ValueError(f"method={method!r} needs calibration data: pass calib= (with "
                             "tokenizer= for strings) or forward_loop=; method='magnitude' "
                             "needs none")
    except BaseException:
        undo(model, rewritten)   # the model as it came
        raise
    if rewritten.experts:
        logger.warning("the MoE experts of %d module(s) are now per-expert nn.Linear layers: "
                       "save with modelopt_lite.save (or quantize next); before save_pretrained "
                       "call modelopt_lite.moe.fuse_experts(model), which keeps the zeros and "
                       "drops the masks", len(rewritten.experts))
    if rewritten.attention:
        logger.warning("%d nn.MultiheadAttention module(s) are now q/k/v/out nn.Linear layers: "
                       "save with modelopt_lite.save; before save_pretrained call "
                       "modelopt_lite.attention.pack_attention(model), which keeps the zeros and "
                       "drops the q/k/v masks", len(rewritten.attention))
    start = time.perf_counter()
    if method in CALIBRATED:
        streamed = (offloaded_streaming(model, offloaded) if offloaded is not None
                    else contextlib.nullcontext())
        with streamed, all_experts_calibrate(model):   # MoE: every expert's Hessian, all tokens
            _prune_calibrated(model, plans, loop, cfg, progress)
    else:
        for p in plans:
            if not p.skipped:
                with at_hand(offloaded, p.name, p.module, write_back=True):
                    prune_magnitude(p, cfg)
        if offloaded is not None:
            offloaded.complete(model)   # masks of layers whose hooks offload buffers
    _record(model, cfg, plans, time.perf_counter() - start)
    logger.info("sparsified %d layer(s) to %s with %s, skipped %d", sum(not p.skipped for p in plans),
                pattern, method, sum(bool(p.skipped) for p in plans))
    return model


def _prune_calibrated(model, plans, loop, cfg, progress) -> None:
    from ..calib.sequential import run_sequential
    from ..models import calibration_blocks

    blocks = [name for name, _ in calibration_blocks(model) if name]   # "": no block stack
    inside = set()
    by_layer: dict[str, list[SparsePlan]] = {}
    for p in plans:
        block = next((b for b in blocks if p.name.startswith(b + ".")), None)
        if block is not None:
            inside.add(p.name)
            by_layer.setdefault(block, []).append(p)
    if by_layer:
        def process(i, name, layer, inputs):
            prune_plans(by_layer.get(name, []),
                        lambda end_batch: inputs.feed(layer, after_batch=end_batch), cfg)

        run_sequential(model, loop, process, progress=progress, desc=f"{cfg.method} layers")
    rest = [p for p in plans if p.name not in inside]
    if rest:
        prune_plans(rest, lambda end_batch: loop(model), cfg)


def _record(model: nn.Module, cfg: SparsityConfig, plans: list[SparsePlan], seconds: float) -> None:
    state = getattr(model, "_modelopt_lite", None) or {}
    state["sparsity"] = {"config": cfg.to_dict(), "seconds": round(seconds, 3),
                         "layers": [p.record() for p in plans]}
    state.update(flags(model))
    model._modelopt_lite = state


def sparse_modules(model: nn.Module):
    """(name, module) for every module with a ``weight_mask`` buffer."""
    return [(n, m) for n, m in model.named_modules() if "weight_mask" in getattr(m, "_buffers", {})]


def format_sparsity(model: nn.Module) -> str:
    """A table of each sparsified layer: shape, density, weight change, or why it was skipped."""
    state = (getattr(model, "_modelopt_lite", None) or {}).get("sparsity")
    if not state:
        return "model is not sparsified by modelopt_lite"
    lines = [f"{'layer':<44} {'shape':>11}  {'density':>7}  {'|dW|/|W|':>8}  note"]
    for r in state["layers"]:
        shape = "x".join(map(str, r["weight_shape"]))
        dens = f"{r['density']:.3f}" if "density" in r else "-"
        err = f"{r['weight_rel_err']:.3f}" if "weight_rel_err" in r else "-"
        lines.append(f"{r['name'][:44]:<44} {shape:>11}  {dens:>7}  {err:>8}  "
                     f"{r['skipped'] or r['note'] or ''}")
    n = sum(not r["skipped"] for r in state["layers"])
    lines.append(f"{n} layer(s) {state['config']['pattern']} sparse by {state['config']['method']}, "
                 f"{len(state['layers']) - n} skipped")
    return "\n".join(lines)


def deploy_sparse(model: nn.Module, **kwargs):
    """Swap fp16 2:4 linears on CUDA to ``torch.sparse`` semi-structured weights (see deploy.py)."""
    from .deploy import deploy_sparse as _deploy

    return _deploy(model, **kwargs)


__all__ = ["sparsify", "SparsityConfig", "SparsityPatternError", "nm_mask", "is_nm_sparse",
           "nm_fraction", "sparsegpt_prune", "HessianAccumulator", "sparse_modules",
           "format_sparsity", "deploy_sparse"]
