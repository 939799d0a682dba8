"""SmoothQuant W8A8: migrate activation outliers into the weights, with a per-group alpha search.

For a group of linears sharing one input X (e.g. q/k/v after the input norm), the smoothing
scale of input channel j is ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``W_j``: column j
of every linear in the group). ``X / s`` is quantized instead of ``X`` and the weights' columns
are multiplied by ``s``; the division is folded exactly into the producing norm or linear
(:func:`modelopt_lite.models.apply_group_scale_`), or kept as an explicit multiply where there is
no foldable producer.

With ``alpha=None`` each group's alpha is picked from ``alpha_grid`` by minimising the
fake-quantized (weights and activations) output error of the group's block (``self_attn`` for
q/k/v, ``mlp`` for gate/up, ``down_proj`` for up -> down) on calibration data, layer by layer:
layer i is searched on the outputs of the already quantized layers < i. Static activation
ranges are calibrated afterwards, on the smoothed activations (those of rotated linears, see
``rotate``, clipped where a post-norm follows them, see ``rotate_clip_grid``); then the layer's
INT8 weights are rounded onto their per-channel grid with GPTQ
(:mod:`modelopt_lite.algorithms.gptq`) on the Hessian of the quantized inputs they see.

Example::

    model = quantize(model, "int8_smoothquant", calib=texts, tokenizer=tok)
    cfg = get_preset("int8_smoothquant").replace(algorithm=SmoothQuantConfig(alpha=0.5))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import ClassVar

import torch
from torch import nn

from ..calib.distributed import global_offset, reduce_sum_
from ..calib.sequential import run_sequential
from ..config import (ConfigError, QuantConfig, QuantizerSpec, register_algorithm,
                      register_preset)
from ..models import (Group, apply_group_scale_, block_post_norm, calibration_blocks,
                      layer_groups, rotate_linear_input_)
from ..nn.functional import hadamard
from ..nn.quant_modules import is_quantized
from ..nn.tensor_quantizer import CalibrationError
from ..sparsity.sparsegpt import HessianAccumulator, budget_chunks
from . import register_applier, without_convs
from .gptq import gptq_round_linears
from .rtn import calibrate_activations, calibrate_quantizers

logger = logging.getLogger(__name__)

DEFAULT_GRID = tuple(round(0.1 * i, 2) for i in range(11))
ROTATED_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))  # 1.0 .. 0.6
# Linears fed by another linear or by attention rather than by a norm: the MLP's output
# projection (its input, a gated product, has large values in different channels for
# different tokens) and the attention output projection, under their common names.
DEFAULT_ROTATE = ("down_proj", "o_proj", "fc2", "out_proj", "dense_4h_to_h", "mlp.c_proj",
                  "attn.c_proj", "attention.dense", "w2")
MAX_ALPHA = 2.0


@register_algorithm("smoothquant")
@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha``: a fixed migration strength in [0, 2] (the paper's range is [0, 1]; above 1
    the scale also grows with the weight's column maximum), or None to search ``alpha_grid`` per
    group. ``refine``: after the grid, this many bisection rounds try the two points halfway
    between the best alpha and its grid neighbours (each round halves the step: 0.1 -> 0.05
    -> 0.025 on the default grid), keeping any that scores lower. ``search_batches``: how many
    calibration batches score each candidate (all batches feed the statistics); 16 by default
    (8 -> 16: Gemma-3-270M 12.844 -> 12.802, SmolLM2-135M 12.963 -> 12.998 perplexity, for
    about 1.6x the calibration time).
    ``smooth_unfoldable``: also smooth quantized linears of a decoder layer whose scale cannot
    fold (no table group covers them, e.g. ``o_proj`` under grouped-query attention, or the
    row keeps an explicit multiply, e.g. a cross-attention's key / value), keeping their scale
    as an explicit multiply. ``clip_grid``: with a searched alpha and static activations, the
    group's calibrated activation range is then scaled by the ratio of this grid with the
    smallest block output error (``(1.0,)``, the default, keeps the calibrator's range: on
    SmolLM2-135M clipping lowered the block errors yet raised test perplexity, 13.02 -> 13.08,
    since the rare outlier tokens it clips are few in the scored batches). ``gptq``: once a
    layer is smoothed and its activation ranges are set, round its INT8 weights onto their
    per-channel grid with GPTQ's error feedback (:mod:`modelopt_lite.algorithms.gptq`) on the
    Hessian of the quantized inputs the weights see, instead of to nearest (the smoothed
    weights carry the activation outliers, so their rounding matters); on by default
    (SmolLM2-135M, searched alpha: 13.055 -> 12.991 perplexity; Gemma-3-270M 13.124 -> 13.130,
    and at alpha 1.0 13.079 -> 13.045; at a fixed alpha 0.5, where the activation outliers
    dominate, it cost 0.06 on both). ``gptq_damp`` is its dampening. ``rotate``: names
    (fnmatch patterns on the name inside a decoder layer, or on its last part) of linears
    whose input is rotated online by a block-Hadamard matrix of order ``rotate_block`` (or the
    largest power of two dividing both it and the input width), with the weight's input
    columns rotated alike so the float function is unchanged; the rotated input is then
    smoothed by an explicit multiply. The rotation spreads each token's large values over its
    block before the per-tensor INT8 grid (a gated MLP's product has them in different
    channels for different tokens, which no per-channel scale follows). By default the MLP
    and attention output projections (``DEFAULT_ROTATE``): searched alpha with GPTQ,
    Gemma-3-270M 13.130 -> 12.878, SmolLM2-135M 12.991 -> 12.963 perplexity (smoothing first,
    folded into the producer, and rotating after it gave 13.032 on Gemma); rotating every
    linear 12.911. ``rotate=()`` turns it off. Cost: a ``[b, b]`` matmul per token in front
    of each rotated linear (``b / out_features`` of the linear's own FLOPs: 20 % for
    Gemma-3-270M's down_proj at b = 128, ~3 % at Llama-3-8B widths), exported as Reshape,
    MatMul, Reshape before the explicit Mul and the Q/DQ pair. ``rotate_clip_grid``: for a
    rotated linear whose output the architecture normalizes per token before the residual add
    (``Arch.post_norms``: Gemma 2/3's sandwich norms), the static activation range is scaled by
    the ratio of this grid with the smallest error after that norm (each token's error relative
    to its own output, which a per-tensor grid weighs against the small tokens). After the
    rotation the input is close to Gaussian and its calibrated maximum lies in the rare tail;
    Gemma-3-270M's down_proj picks 0.65-0.85 (searched alpha with GPTQ: 12.878 -> 12.844
    perplexity). Where no post-norm follows, the calibrated range
    is kept (scored on the raw output the picks were 0.85-0.95 and test perplexity did not
    move). ``(1.0,)`` turns it off. Clip candidates of every group are scored after the
    block's post-norm where the architecture has one."""

    alpha: float | None = None
    alpha_grid: tuple[float, ...] = DEFAULT_GRID
    refine: int = 2
    clip_grid: tuple[float, ...] = (1.0,)
    search_batches: int = 16
    smooth_unfoldable: bool = True
    gptq: bool = True
    gptq_damp: float = 0.01
    rotate: tuple[str, ...] = DEFAULT_ROTATE
    rotate_block: int = 128
    rotate_clip_grid: tuple[float, ...] = ROTATED_CLIP_GRID
    name: ClassVar[str]

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= MAX_ALPHA:
            raise ConfigError(f"smoothquant alpha must be in [0, {MAX_ALPHA}] or None, "
                              f"got {self.alpha}")
        if not self.alpha_grid or any(not 0.0 <= a <= MAX_ALPHA for a in self.alpha_grid):
            raise ConfigError(f"alpha_grid must be a non-empty tuple of values in [0, {MAX_ALPHA}], "
                              f"got {self.alpha_grid}")
        if self.search_batches < 1:
            raise ConfigError(f"search_batches must be >= 1, got {self.search_batches}")
        for field in ("clip_grid", "rotate_clip_grid"):
            grid = getattr(self, field)
            if not grid or any(not 0.0 < r <= 1.0 for r in grid):
                raise ConfigError(f"{field} must be a non-empty tuple of ratios in (0, 1], "
                                  f"got {grid}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ConfigError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.rotate_block < 2 or self.rotate_block & (self.rotate_block - 1):
            raise ConfigError(f"rotate_block must be a power of two >= 2 (a Hadamard order), "
                              f"got {self.rotate_block}")
        if isinstance(self.rotate, str):
            raise ConfigError(f"rotate takes a tuple of name patterns, e.g. "
                              f"({self.rotate!r},), got the string {self.rotate!r}")
        if self.refine < 0:
            raise ConfigError(f"refine must be >= 0 bisection rounds, got {self.refine}")


# --- pure tensor functions ---

def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float,
                     eps: float = 1e-5) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, both maxima clamped to ``eps``."""
    x = x_absmax.float().clamp(min=eps)
    w = w_absmax.float().clamp(min=eps)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=eps)


def group_weight_absmax(linears) -> torch.Tensor:
    """Per-input-channel max |W| over every linear of a group (2-D ``[out, in]`` views)."""
    return torch.stack([m.weight_2d().detach().abs().float().amax(0) for m in linears]).amax(0)


def output_error(outs, refs, post=None) -> float:
    """Sum of squared differences over batches (and ranks), relative to the reference's norm;
    ``post`` (a module, e.g. a post-norm) maps both sides first."""
    if post is not None:
        outs, refs = [post(o) for o in outs], [post(r) for r in refs]
    zero = torch.zeros((), dtype=torch.float64, device=refs[0].device if refs else None)
    num = sum(((o.double() - r.double()).pow(2).sum() for o, r in zip(outs, refs)), zero)
    den = sum((r.double().pow(2).sum() for r in refs), zero)
    sums = reduce_sum_(torch.stack([num, den]))
    return (sums[0] / sums[1].clamp(min=1e-30)).item()


# --- one group: capture its block, score candidates, keep the best ---

class _BlockCapture:
    """Forward hooks keeping a block's inputs and float outputs for the first ``limit`` calls."""

    def __init__(self, block: nn.Module, limit: int):
        self.block, self.limit = block, limit
        self.inputs, self.outputs = [], []

    def _pre(self, module, args, kwargs):
        if len(self.inputs) < self.limit:
            self.inputs.append((args, kwargs))

    def _post(self, module, args, kwargs, out):
        if len(self.outputs) < self.limit:
            self.outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    def __enter__(self):
        self.handles = [self.block.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.block.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @torch.no_grad()
    def replay(self, divide_by: torch.Tensor | None = None):
        """Run the block again on the kept inputs; ``divide_by`` scales its input channels (a
        scale folded into the producer, which the kept inputs come from, acts this way)."""
        outs = []
        for args, kwargs in self.inputs:
            if divide_by is not None:
                args, kwargs = _divide_hidden(args, kwargs, divide_by)
            out = self.block(*args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs


def _divide_hidden(args, kwargs, s):
    if args:
        return (args[0] / s.to(args[0].dtype), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] / s.to(
        kwargs["hidden_states"].dtype)}


@dataclass
class GroupSmoother:
    """Apply / undo / score one group's smoothing inside one decoder layer."""

    layer: nn.Module
    group: Group
    x_absmax: torch.Tensor

    def __post_init__(self):
        self.linears = [self.layer.get_submodule(n) for n in self.group.linears]
        self.w_absmax = group_weight_absmax(self.linears)
        mods = self.linears + ([self.layer.get_submodule(self.group.prev)]
                               if self.group.prev is not None else [])
        self._quantized = [m for m in mods if is_quantized(m)]
        self._saved = [(m, {k: v.detach().clone() for k, v in m.named_parameters(recurse=False)})
                       for m in mods]
        self._pqs = [m.input_quantizer.pre_quant_scale for m in self.linears]

    def apply(self, alpha: float, clip: float = 1.0) -> torch.Tensor:
        """Fold the scale for ``alpha`` (from the original weights) and set provisional
        activation ranges (the smoothed max, times ``clip``)."""
        self.restore()
        s = smoothing_scales(self.x_absmax, self.w_absmax, alpha).to(self.x_absmax.device)
        apply_group_scale_(self.layer, self.group, s)
        self._refresh_weight_ranges()
        self.set_activation_range(s, clip)
        return s

    def set_activation_range(self, s: torch.Tensor, clip: float = 1.0) -> None:
        act_amax = (self.x_absmax.float() / s).amax() * clip
        for m in self.linears:
            m.weight_quantizer.enabled = m.input_quantizer.enabled = True
            if not m.input_quantizer.spec.dynamic:
                m.input_quantizer.set_range(act_amax)

    @property
    def static(self) -> bool:
        return any(not m.input_quantizer.spec.dynamic for m in self.linears)

    def _refresh_weight_ranges(self) -> None:
        """Weight ranges follow the folded weights (a linear producer's rows change too)."""
        for m in self._quantized:
            if m.weight_quantizer.amax is not None:
                m.weight_quantizer.init_from_weight(m.weight_2d())

    @torch.no_grad()
    def restore(self) -> None:
        for m, params in self._saved:
            for k, v in params.items():
                getattr(m, k).copy_(v)
        for m, pqs in zip(self.linears, self._pqs):
            m.input_quantizer.set_pre_quant_scale(pqs)
        self._refresh_weight_ranges()

    def score(self, capture: _BlockCapture, alpha: float) -> float:
        """Block output error for ``alpha``. The block's input is the group's input (the
        producer's output, per the architecture table), so a folded scale divides it."""
        return self._replay_error(capture, self.apply(alpha))

    def score_clip(self, capture: _BlockCapture, s: torch.Tensor, clip: float,
                   post: nn.Module | None = None) -> float:
        """Block output error (after ``post``) with the already applied scale ``s`` and the
        range times ``clip``."""
        self.set_activation_range(s, clip)
        return self._replay_error(capture, s, post)

    @torch.no_grad()
    def _replay_error(self, capture: _BlockCapture, s: torch.Tensor, post=None) -> float:
        folded = self.group.prev is not None
        return output_error(capture.replay(s if folded else None), capture.outputs, post)


def search_alpha(smoother: GroupSmoother, capture: _BlockCapture, grid,
                 refine: int = 0) -> tuple[float, dict]:
    """The alpha with the smallest block output error, and every candidate's error.

    Every point of ``grid`` is scored; then ``refine`` rounds each score the midpoints between
    the current best and its nearest scored neighbours on either side."""
    errors = {float(a): smoother.score(capture, float(a)) for a in grid}
    best = min(errors, key=errors.get)
    for _ in range(refine):
        scored = sorted(errors)
        i = scored.index(best)
        for j in (i - 1, i + 1):
            if 0 <= j < len(scored):
                mid = round((best + scored[j]) / 2, 6)
                if mid not in errors:
                    errors[mid] = smoother.score(capture, mid)
        best = min(errors, key=errors.get)
    return best, errors


# --- the module walker ---

def rotate_inputs_(layer: nn.Module, cfg: SmoothQuantConfig) -> dict[str, int]:
    """Rotate the inputs of the layer's quantized linears that ``cfg.rotate`` names by a
    block-Hadamard matrix (:func:`modelopt_lite.models.rotate_linear_input_`); return the
    rotated names and their block sizes."""
    done = {}
    for name, m in layer.named_modules():
        if not (name and cfg.rotate and is_quantized(m) and m.input_quantizer.enabled
                and any(fnmatch(name, p) or fnmatch(name.rsplit(".", 1)[-1], p)
                        for p in cfg.rotate)):
            continue
        if m.weight.dim() != 2:
            if tuple(cfg.rotate) == tuple(DEFAULT_ROTATE):   # the default names a conv too
                logger.info("smoothquant: %s not rotated: a %s, and rotation applies to "
                            "linear layers", m.input_quantizer.name, type(m).__name__)
                continue
            raise ConfigError(f"{m.input_quantizer.name}: rotate applies to linear layers, not "
                              f"{type(m).__name__}; narrow SmoothQuantConfig.rotate")
        if m.mask_2d() is not None:  # a rotated weight would lose its 2:4 zeros
            logger.info("smoothquant: %s not rotated: the layer is 2:4-sparse",
                        m.input_quantizer.name)
            continue
        width = m.in_features_2d
        block = math.gcd(width, cfg.rotate_block)
        if block < 16:
            logger.warning("smoothquant: %s not rotated: its %d input channels have no "
                           "power-of-two block >= 16 dividing them (rotate_block %d)",
                           m.input_quantizer.name, width, cfg.rotate_block)
            continue
        rotate_linear_input_(m, hadamard(block, device=m.weight.device))
        done[name] = block
    return done


def _smoothable_groups(model, layer, cfg: SmoothQuantConfig, rotated=()) -> list[Group]:
    """Table groups whose linears are all quantized with an enabled input quantizer and not
    rotated, plus explicit-multiply groups for the remaining quantized linears when asked."""
    def ok(name):
        m = layer.get_submodule(name)
        return is_quantized(m) and m.input_quantizer.enabled and name not in rotated

    groups, covered = [], set()
    for g in layer_groups(model, layer):
        if g.prev is None and not cfg.smooth_unfoldable:
            continue   # a row's (or an expert's) explicit multiply: not asked for
        if all(ok(n) for n in g.linears):
            groups.append(g)
            covered.update(g.linears)
        else:
            logger.info("smoothquant: group %s -> %s not smoothed (a linear is not quantized "
                        "with activations)", g.prev, g.linears)
    if cfg.smooth_unfoldable:
        rest = {name: m for name, m in layer.named_modules()
                if name and name not in covered and is_quantized(m) and m.input_quantizer.enabled}
        groups += [Group(None, (name,), name) for name in without_convs(
            rest, "smoothquant", "quantized without smoothing")]
    return groups


def _set_layer_quantizers(layer: nn.Module, enabled: dict | bool) -> dict:
    """Set every quantizer's ``enabled`` in the layer; return the previous states."""
    before = {}
    for m in layer.modules():
        if is_quantized(m):
            for q in (m.weight_quantizer, m.input_quantizer):
                before[q] = q.enabled
                q.enabled = enabled[q] if isinstance(enabled, dict) else enabled
    return before


class _LayerProcessor:
    def __init__(self, model, cfg: SmoothQuantConfig):
        self.model, self.cfg = model, cfg
        self.report: dict[str, dict] = {}

    def __call__(self, index, name, layer, inputs) -> None:
        rotated = rotate_inputs_(layer, self.cfg)
        groups = _smoothable_groups(self.model, layer, self.cfg, rotated)
        enabled = _set_layer_quantizers(layer, False)
        first = {g.linears[0]: layer.get_submodule(g.linears[0]) for g in groups}
        turn = {n: m.input_quantizer.rotate for n, m in first.items() if n in rotated}
        stats = inputs.collect_stats(layer, first, transforms=turn, required=False)
        clips = {}
        for g in [g for g in groups if stats[g.linears[0]] is None]:
            logger.info("smoothquant: %s not smoothed: the layer's forward never calls it",
                        g.linears)
        groups = [g for g in groups if stats[g.linears[0]] is not None]
        for g in groups:
            clips[g] = self._smooth_group(name, layer, g, stats[g.linears[0]].absmax, inputs,
                                          rotated=g.linears[0] in rotated)
        for n, block in rotated.items():
            self.report.setdefault(f"{name}.{n}", {"linears": (n,)})["rotation"] = block
        _set_layer_quantizers(layer, enabled)
        calibrate_activations(layer, inputs.forward_loop(layer))
        for g, clip in clips.items():  # the searched clip scales the calibrated range
            for n in g.linears if clip != 1.0 else ():
                q = layer.get_submodule(n).input_quantizer
                if not q.spec.dynamic and q.amax is not None:
                    q.set_range(q.amax * clip)
        if self.cfg.gptq:
            gptq_layer(layer, inputs, self.cfg.gptq_damp, groups)

    def _smooth_group(self, name, layer, group, x_absmax, inputs, rotated=False) -> float:
        """Smooth one group; return the activation-range ratio to apply after calibration."""
        smoother = GroupSmoother(layer, group, x_absmax)
        key = f"{name}.{group.linears[0] if group.prev is None else group.prev}"
        block_name = group.block or group.linears[0]
        post = block_post_norm(self.model, layer, block_name)
        grid = self.cfg.rotate_clip_grid if rotated and post is not None else self.cfg.clip_grid
        search_clip = smoother.static and len(grid) > 1
        if self.cfg.alpha is not None and not search_clip:
            smoother.apply(self.cfg.alpha)
            self.report[key] = {"alpha": self.cfg.alpha, "linears": group.linears}
            return 1.0
        capture = _BlockCapture(layer.get_submodule(block_name), self.cfg.search_batches)
        with capture:
            inputs_subset(inputs, self.cfg.search_batches).run(layer)
        if self.cfg.alpha is None:
            best, errors = search_alpha(smoother, capture, self.cfg.alpha_grid, self.cfg.refine)
        else:
            best, errors = self.cfg.alpha, {}
        s = smoother.apply(best)
        rec = {"alpha": best, "clip": 1.0, "errors": errors, "linears": group.linears}
        if best in errors:
            rec["error"] = errors[best]
        if search_clip:  # scored after the block's post-norm, where there is one
            clip_errors = {float(r): smoother.score_clip(capture, s, float(r), post)
                           for r in sorted(set(grid) | {1.0}, reverse=True)}
            rec["clip"] = min(clip_errors, key=clip_errors.get)
            rec["clip_errors"] = clip_errors
            smoother.set_activation_range(s, rec["clip"])
        self.report[key] = rec
        logger.debug("%s: alpha %.2f, clip %.2f", key, best, rec["clip"])
        return rec["clip"]


@torch.no_grad()
def gptq_layer(layer: nn.Module, inputs, percdamp: float = 0.01, groups=()) -> None:
    """GPTQ-round the weights of every weight-quantized (per channel or block) linear (not
    a convolution) of ``layer`` onto a grid fixed from its current weight, on the Hessian of the
    input the weight multiplies (after the input quantizer: pre-quant scale and fake
    quantization).
    Linears of one of ``groups`` whose input quantizers agree share one Hessian and one
    factorisation (their rows stacked)."""
    mods = without_convs({n: m for n, m in layer.named_modules()
                          if is_quantized(m) and m.weight_quantizer.enabled
                          and m.weight_quantizer.spec.granularity != "per_tensor"},
                         "gptq", "keep round-to-nearest weights")
    if not mods:
        return
    sets = _shared_input_sets(mods, groups)
    device = next(layer.parameters()).device
    chunks = _hessian_chunks(sets, mods)   # MoE layers: many experts, bounded memory
    pending = []   # several chunks: every replay sees the unrounded layer; results at the end
    for chunk in chunks:
        accs = {names[0]: HessianAccumulator(mods[names[0]].in_features_2d, device=device,
                                             exact=True) for names in chunk}

        def hook(acc):
            def add(module, args):
                acc.add(module.input_quantizer(args[0]))
            return add

        handles = [mods[n].register_forward_pre_hook(hook(acc)) for n, acc in accs.items()]
        try:
            inputs.feed(layer)
        finally:
            for h in handles:
                h.remove()
        for names in chunk:
            members = [mods[n] for n in names]
            acc = accs.pop(names[0])
            acc.reduce()
            if acc.count.item() == 0:   # never called by the layer's forward: left as it is
                continue
            before = [_weight_state(m) for m in members] if len(chunks) > 1 else None
            for m in members:
                m.weight_quantizer.init_from_weight(m.weight_2d().detach())
            gptq_round_linears(members, acc.hessian().float(), percdamp)
            if before is not None:
                pending += [(m, _weight_state(m, "cpu")) for m in members]
                for m, state in zip(members, before):
                    _set_weight_state(m, state)
    for m, state in pending:
        _set_weight_state(m, state)


def _weight_state(m, device=None) -> tuple:
    """A linear's weight and weight range, copied (to ``device``)."""
    q = m.weight_quantizer
    copy = lambda t: None if t is None else t.detach().to(device, copy=True)  # noqa: E731
    return copy(m.weight), copy(q.amax), copy(q.amin)


@torch.no_grad()
def _set_weight_state(m, state) -> None:
    weight, amax, amin = state
    m.weight.copy_(weight)
    if amax is not None:
        dev = m.weight.device
        m.weight_quantizer.set_range(amax.to(dev), None if amin is None else amin.to(dev))


HESSIAN_BYTES = 8 << 30   # float64 Hessians held at once by gptq_layer (one replay per chunk)
# Chunked results equal one pass: every chunk's replay sees the layer as it came, and the
# rounded weights are written after the last chunk.


def _hessian_chunks(sets: list[list[str]], mods: dict) -> list[list[list[str]]]:
    """``sets`` split so each chunk's float64 Hessians fit in :data:`HESSIAN_BYTES` (a dense
    layer is one chunk; a MoE layer with hundreds of experts replays once per chunk)."""
    return budget_chunks(sets, lambda names: 8 * mods[names[0]].in_features_2d ** 2,
                         HESSIAN_BYTES)


def _shared_input_sets(mods: dict, groups) -> list[list[str]]:
    """Names of ``mods`` in sets that see the same quantized input: a group's linears when
    their input quantizers and weight specs agree, every other linear on its own."""
    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None
                                             and a.shape == b.shape and torch.equal(a, b))

    sets, seen = [], set()
    for g in groups:
        names = [n for n in g.linears if n in mods and n not in seen]
        first = names[0] if names else None
        shared = [n for n in names if first is not None
                  and mods[n].weight_quantizer.spec == mods[first].weight_quantizer.spec
                  and mods[n].input_quantizer.spec == mods[first].input_quantizer.spec
                  and mods[n].input_quantizer.enabled == mods[first].input_quantizer.enabled
                  and same(mods[n].input_quantizer.amax, mods[first].input_quantizer.amax)
                  and same(mods[n].input_quantizer.pre_quant_scale,
                           mods[first].input_quantizer.pre_quant_scale)]
        if shared:
            sets.append(shared)
            seen.update(shared)
    return sets + [[n] for n in mods if n not in seen]


def inputs_subset(inputs, n: int):
    """A view of this rank's share of the first ``n`` captured batches of all ranks (by global
    index, so N ranks search on the batches one process would)."""
    first, _ = global_offset(len(inputs.entries))
    view = type(inputs).__new__(type(inputs))
    view.__dict__.update(inputs.__dict__)
    view.entries = inputs.entries[:max(0, n - first)]
    return view


def _outside_quantizers(model) -> list:
    """Static input quantizers outside the decoder layers (OPT-350m's ``project_in`` and
    ``project_out``, a projector in front of the decoder)."""
    inside = {id(m) for _, block in calibration_blocks(model) for m in block.modules()}
    return [m.input_quantizer for m in model.modules()
            if is_quantized(m) and id(m) not in inside and m.input_quantizer.enabled
            and not m.input_quantizer.spec.dynamic]


def _calibrate_outside_layers(model, forward_loop) -> None:
    """Static input quantizers outside the decoder layers (if any) calibrate on the whole model."""
    quantizers = _outside_quantizers(model)
    if quantizers:
        calibrate_quantizers(model, quantizers, forward_loop)


@register_applier("smoothquant")
def apply(model: nn.Module, config: QuantConfig, forward_loop=None, progress=True) -> dict:
    """Smooth, search alpha per group, fold, and calibrate static activation ranges, layer by
    layer. Returns (and keeps as ``model._smoothquant_report``) each group's alpha and error."""
    cfg = config.algorithm
    if config.input is None:
        raise ConfigError("smoothquant moves activation outliers into the weights, so it needs "
                          "an input (activation) quantizer spec; use the 'int8_smoothquant' "
                          "preset or set QuantConfig.input")
    if forward_loop is None:
        raise CalibrationError("smoothquant needs calibration data for its activation "
                               "statistics; pass calib= or forward_loop= to quantize()")
    processor = _LayerProcessor(model, cfg)
    outside = _outside_quantizers(model)
    for q in outside:   # no range yet: pass through while the layers' inputs are captured
        q.enabled = False
    try:
        run_sequential(model, forward_loop, processor, progress=progress, desc="smoothquant")
    finally:
        for q in outside:
            q.enabled = True
    _calibrate_outside_layers(model, forward_loop)
    model._smoothquant_report = processor.report
    return processor.report


_W8 = QuantizerSpec(num_bits=8, granularity="per_channel")
register_preset("int8_smoothquant", QuantConfig(
    weight=_W8, input=QuantizerSpec(num_bits=8, granularity="per_tensor"),
    algorithm=SmoothQuantConfig()))
register_preset("int8_smoothquant_dynamic", QuantConfig(
    weight=_W8, input=QuantizerSpec(num_bits=8, granularity="per_token", dynamic=True),
    algorithm=SmoothQuantConfig()))

__all__ = ["SmoothQuantConfig", "DEFAULT_ROTATE", "smoothing_scales", "search_alpha", "apply",
           "GroupSmoother", "gptq_layer", "rotate_inputs_"]
