"""The module walker: choose layers, compute N:M masks, store them as ``weight_mask`` buffers.

Masks live on the 2-D "sparsity view" of a weight: ``[out, in]`` for Linear, the transpose of
Hugging Face's Conv1D, and ``[out, *kernel, in]`` flattened (input channels innermost) for
torch's Conv1d / Conv2d / Conv3d, so every group of ``m`` is ``m`` consecutive input channels,
the layout sparse tensor cores use.
Calibrated methods (SparseGPT, Wanda) run decoder layer by decoder layer through
:func:`modelopt_lite.calib.sequential.run_sequential`: only one layer's Hessians exist at a
time and each layer is pruned on the outputs of the already-pruned layers before it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..calib.sequential import StopForward
from ..config import DEFAULT_EXCLUDE, DEFAULT_MODULE_TYPES, ConfigError
from ..nn.quant_modules import CONV_TYPES, quant_class_for
from .masks import SparsityPatternError, magnitude_scores, nm_mask, parse_pattern, wanda_scores
from .sparsegpt import HessianAccumulator, budget_chunks, sparsegpt_prune

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "sparsegpt", "wanda")
CALIBRATED = ("sparsegpt", "wanda")


@dataclass(frozen=True)
class SparsityConfig:
    """How ``sparsify`` prunes: pattern, method, which layers, and SparseGPT's settings."""

    pattern: str = "2:4"
    method: str = "magnitude"
    targets: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES
    on_indivisible: str = "skip"
    block_size: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        parse_pattern(self.pattern)
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not allowed; choose one of {list(METHODS)}")
        if self.on_indivisible not in ("skip", "error"):
            raise ConfigError("on_indivisible must be 'skip' or 'error'")

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class SparsePlan:
    name: str
    module: nn.Module
    skipped: str | None = None
    note: str | None = None
    stats: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"name": self.name, "type": type(self.module).__name__,
                "weight_shape": list(self.module.weight.shape), "skipped": self.skipped,
                "note": self.note, **self.stats}


# --- the 2-D sparsity view of a weight ---

def _kind(module: nn.Module) -> str:
    names = {c.__name__ for c in type(module).__mro__}
    if "Conv1D" in names:   # Hugging Face's: a linear with its weight stored [in, out]
        return "conv1d"
    if isinstance(module, CONV_TYPES):
        return "conv"
    return "linear"


def sparse_view(module: nn.Module, t: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (default: the weight) as the 2-D ``[out, in]`` matrix the N:M groups run along."""
    t = module.weight if t is None else t
    kind = _kind(module)
    if kind == "conv1d":
        return t.t()
    if kind == "conv":
        return t.movedim(1, -1).reshape(t.shape[0], -1)
    return t


def from_sparse_view(module: nn.Module, t2d: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sparse_view`: back to the weight's own shape and layout."""
    w = module.weight
    kind = _kind(module)
    if kind == "conv1d":
        return t2d.t().contiguous()
    if kind == "conv":
        o, i, *kernel = w.shape
        return t2d.reshape(o, *kernel, i).movedim(-1, 1).contiguous()
    return t2d.contiguous()


def group_dim(module: nn.Module) -> int:
    """The length that must be a multiple of M: input features (channels for a conv)."""
    w = module.weight
    return {"conv1d": w.shape[0], "conv": w.shape[1]}.get(_kind(module), w.shape[-1])


# --- planning ---

def _selected(name: str, module: nn.Module, cfg: SparsityConfig) -> bool:
    types = {c.__name__ for c in type(module).__mro__}
    if not (types & set(cfg.module_types)) or quant_class_for(type(module)) is None:
        return False
    if _kind(module) == "conv" and (module.groups != 1):
        return False
    match = lambda pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
    return match(cfg.targets) and not match(cfg.exclude)


PARAMETRIZED = ("its weight is computed by a parametrization (e.g. weight_norm) from other "
                "tensors, so a mask cannot zero it; remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'))")


def plan_sparsity(model: nn.Module, cfg: SparsityConfig) -> list[SparsePlan]:
    """Every selected layer, with the reason it is skipped where it cannot take the pattern."""
    from ..models import other_modalities

    _, m = cfg.nm
    plans, towers = [], other_modalities(model, cfg.targets)
    for name, module in model.named_modules():
        if not name or not _selected(name, module, cfg):
            continue
        plan = SparsePlan(name, module)
        dim = group_dim(module)
        if towers and towers(name):
            plan.skipped = towers.reason
        elif parametrize.is_parametrized(module, "weight"):
            plan.skipped = PARAMETRIZED
        elif dim % m:
            reason = (f"input dim {dim} is not a multiple of {m}, so it cannot be split into "
                      f"groups of {m}")
            if cfg.on_indivisible == "error" or name in cfg.targets:
                raise SparsityPatternError(
                    f"{name}: {reason} for {cfg.pattern} sparsity. Fix: exclude the layer "
                    f"(exclude=[..., '{name}']), pad its input features to a multiple of {m}, "
                    "or pass on_indivisible='skip'")
            plan.skipped = reason
        elif cfg.method in CALIBRATED and _kind(module) == "conv":
            plan.note = f"{cfg.method} supports linear layers; this conv uses magnitude"
        plans.append(plan)
    if not any(not p.skipped for p in plans):
        seen = [n for n, mod in model.named_modules() if n and quant_class_for(type(mod))][:8]
        raise SparsityPatternError(
            f"sparsify selects no layer that can take {cfg.pattern}: targets={list(cfg.targets)}, "
            f"exclude={list(cfg.exclude)}; candidate layers here: {seen or 'none'}; "
            f"skipped: {[(p.name, p.skipped) for p in plans][:5]}")
    return plans


# --- applying masks ---

@torch.no_grad()
def set_mask_(module: nn.Module, mask2d: torch.Tensor, weight2d: torch.Tensor | None = None) -> None:
    """Store ``weight_mask`` (bool, the weight's shape) and zero the pruned weights."""
    mask = from_sparse_view(module, mask2d.to(torch.bool))
    if weight2d is not None:
        module.weight.copy_(from_sparse_view(module, weight2d.to(module.weight.dtype)))
    if "weight_mask" in module._buffers:
        module.weight_mask = mask.to(module.weight.device)
    else:
        module.register_buffer("weight_mask", mask.to(module.weight.device))
    module.weight.mul_(module.weight_mask.to(module.weight.dtype))


def _mask_stats(module: nn.Module, w_before: torch.Tensor) -> dict:
    w_after = sparse_view(module).detach().float()
    kept = module.weight_mask.float().mean().item()
    rel = ((w_after - w_before).norm() / w_before.norm().clamp_min(1e-12)).item()
    return {"density": round(kept, 6), "weight_rel_err": round(rel, 6)}


def prune_magnitude(plan: SparsePlan, cfg: SparsityConfig) -> None:
    n, m = cfg.nm
    w = sparse_view(plan.module).detach().float().clone()
    set_mask_(plan.module, nm_mask(magnitude_scores(w), n, m))
    plan.stats = _mask_stats(plan.module, w)


def prune_group(plans: list[SparsePlan], acc: HessianAccumulator | None, cfg: SparsityConfig) -> None:
    """SparseGPT or Wanda for layers that read the same input (one Hessian, rows stacked)."""
    if acc is None:
        for p in plans:
            prune_magnitude(p, cfg)
        return
    n, m = cfg.nm
    ws = [sparse_view(p.module).detach().float().clone() for p in plans]
    w = torch.cat(ws, 0)
    if cfg.method == "wanda":
        w_new, mask = None, nm_mask(wanda_scores(w, acc.input_sq_sum()), n, m)
    else:
        w_new, mask = sparsegpt_prune(w, acc.hessian(), n, m, cfg.block_size, cfg.percdamp)
    rows = [x.shape[0] for x in ws]
    masks = mask.split(rows)
    news = w_new.split(rows) if w_new is not None else [None] * len(plans)
    for p, w_old, mk, wn in zip(plans, ws, masks, news):
        set_mask_(p.module, mk, wn)
        p.stats = _mask_stats(p.module, w_old)


class _InputCollector:
    """Forward pre-hooks that accumulate ``X^T X`` of each planned linear's input.

    Linears that read the very same input tensor (q/k/v, gate/up, every MoE expert's gate/up
    while all experts calibrate) share one accumulator: the first batch decides the sharing,
    so the Hessian is computed once per distinct input. When
    the replay reports batch ends (:meth:`end_batch`) and the first batch called every hooked
    linear once, later batches stop right after the last one's input is recorded
    (:class:`~modelopt_lite.calib.sequential.StopForward`): the rest of the forward, such as
    ``down_proj`` itself, is not needed for statistics.
    """

    def __init__(self, plans: list[SparsePlan]):
        self.accs: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}
        self.handles = []
        self._inputs: list = []   # (weak ref to an input tensor, its owner), first batch
        self._calls: list[str] | None = []  # call order in the first batch
        self._stop_at: str | None = None
        for p in plans:
            if p.skipped or _kind(p.module) == "conv":
                continue
            self.handles.append(p.module.register_forward_pre_hook(self._hook(p.name)))

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if name not in self.owner:
                owner = next((o for ref, o in reversed(self._inputs) if ref() is x), None)
                self.owner[name] = owner or name
                if owner is None:
                    self.accs[name] = HessianAccumulator(x.shape[-1], module.weight.device)
                self._inputs.append((weakref.ref(x), self.owner[name]))
            if self.owner[name] == name:
                self.accs[name].add(x)
            if self._calls is not None:
                self._calls.append(name)
            elif name == self._stop_at:
                raise StopForward
        return hook

    def end_batch(self) -> None:
        """Called between batches: after the first, fix where later batches may stop."""
        self._inputs = []
        if self._calls is not None:
            once = len(set(self._calls)) == len(self._calls)
            self._stop_at = self._calls[-1] if self._calls and once else None
            self._calls = None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._inputs = []

    def groups(self, plans: list[SparsePlan]):
        """[(plans sharing an input, accumulator or None)] in plan order."""
        out: dict[str, list[SparsePlan]] = {}
        for p in plans:
            if not p.skipped:
                out.setdefault(self.owner.get(p.name, "~" + p.name), []).append(p)
        return [(ps, self.accs.get(key)) for key, ps in out.items()]


def prune_plans(plans: list[SparsePlan], run, cfg: SparsityConfig) -> None:
    """Collect inputs while ``run(end_batch)`` replays the model (or a layer), then prune every
    plan. ``run`` may call ``end_batch()`` after each batch to let later batches stop early."""
    collector = _InputCollector(plans)
    try:
        if collector.handles:
            run(collector.end_batch)
    finally:
        collector.remove()
    for group, acc in collector.groups(plans):
        for part in _stack_chunks(group):
            prune_group(part, acc, cfg)


STACK_BYTES = 4 << 30   # float32 weight rows prune_group stacks at once


def _stack_chunks(group: list[SparsePlan]) -> list[list[SparsePlan]]:
    """A shared-input group split so each part's stacked float32 weights fit in
    :data:`STACK_BYTES` (the rows are pruned independently on the one Hessian, so the masks do
    not depend on the split): a dense layer's q/k/v stays one part, hundreds of MoE experts'
    gate/up projections become several."""
    return budget_chunks(group, lambda p: 4 * p.module.weight.numel(), STACK_BYTES)
