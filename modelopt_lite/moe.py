"""Mixture-of-experts models: fused 3-D expert weights become one ``nn.Linear`` per projection.

Recent transformers versions (5.x) keep a MoE layer's routed experts in one module holding
fused 3-D parameters: ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, PhiMoE, GraniteMoE, GLM-4-MoE and more; the
class is decorated with ``transformers.integrations.moe.use_experts_implementation``). A
quantizer that looks for ``nn.Linear`` layers would leave these weights, most of the model,
in float. :func:`unfuse_experts` replaces every such module with :class:`LinearExperts`:
numbered :class:`Expert` children whose ``gate_proj``, ``up_proj`` and ``down_proj`` are plain
``nn.Linear`` layers (``mlp.experts.3.gate_proj``), computing the same function in the same
order as the fused module's eager loop. Every layer type of the toolkit (fake quant, AWQ and
SmoothQuant, 2:4 sparsity, ``deploy()``'s ``Int4Linear``) then applies expert by expert.

The layouts the decorator describes are all read: transposed weights (``[E, in, out]``,
GPT-OSS), interleaved gate/up rows (``is_concatenated=False``), biases, experts without a gate
(``up_proj`` only), a norm after each expert, and model-specific gating (``_apply_gate``,
called with the gate and up outputs laid out as the fused module expects them).

:func:`~modelopt_lite.quantize` and :func:`~modelopt_lite.sparsify` call this themselves.

Example::

    from modelopt_lite.moe import unfuse_experts
    unfuse_experts(model)        # in place; the model's outputs do not change
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from .nn.replace import replace_modules

logger = logging.getLogger(__name__)

_LAYOUT = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


class UnsupportedExpertsError(ValueError):
    """A fused experts module whose layout or state this module cannot unfuse."""


class Expert(nn.Module):
    """One routed expert: ``down_proj(act(gate_proj(x), up_proj(x)))`` (no ``gate_proj`` when
    the experts are not gated). ``act`` is the owning :class:`LinearExperts`' gating."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear,
                 owner: "LinearExperts"):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.__dict__["_activate"] = owner.activate   # a plain attribute: no module cycle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x) if hasattr(self, "gate_proj") else None
        return self.down_proj(self._activate(gate, self.up_proj(x)))


class LinearExperts(nn.Module):
    """Drop-in for a fused experts module: ``forward(hidden_states, top_k_index,
    top_k_weights)`` with ``hidden_states`` ``[tokens, hidden]`` and the router's top-k expert
    ids and weights ``[tokens, k]``. Children ``"0"`` .. ``"E-1"`` are the :class:`Expert`
    modules; ``gating`` is the fused module stripped of its expert weights, kept for its
    activation and ``_apply_gate``; ``post_expert_norm`` when the model has one."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        layout = _layout(fused)
        self.num_experts = _num_experts(fused)
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = layout
        self.fused_type = type(fused).__name__
        self.calibrate_all = False   # see all_experts_calibrate()
        self._default_gate = _uses_default_gate(fused)
        experts = _split(fused, self.num_experts, layout)
        norm = getattr(fused, "post_expert_norm", None) if getattr(
            fused, "has_post_expert_norm", False) else None
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                     "down_proj_bias", "post_expert_norm"):
            if name in fused._parameters or name in fused._modules:
                delattr(fused, name)
        self.gating = fused
        if norm is not None:
            self.post_expert_norm = norm
        for e, (gate, up, down) in enumerate(experts):
            self.add_module(str(e), Expert(gate, up, down, self))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The original fused module with its 3-D weights rebuilt from the expert linears."""
        fused = self.gating
        t = self.is_transposed
        lay = (lambda w: w.t()) if t else (lambda w: w)
        ups, up_b, downs, down_b = [], [], [], []
        for ex in self.experts():
            w, b = ex.up_proj.weight, ex.up_proj.bias
            if self.has_gate:
                w = _join(ex.gate_proj.weight, w, 0, self.is_concatenated)
                b = None if b is None else _join(ex.gate_proj.bias, b, 0, self.is_concatenated)
            ups.append(lay(w))
            up_b.append(b)
            downs.append(lay(ex.down_proj.weight))
            down_b.append(ex.down_proj.bias)
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        trains = self[0].up_proj.weight.requires_grad   # as the weights were when unfused
        param = lambda ts: nn.Parameter(torch.stack(ts), requires_grad=trains)  # noqa: E731
        fused.register_parameter(up_name, param(ups))
        fused.register_parameter("down_proj", param(downs))
        if self.has_bias:
            fused.register_parameter(f"{up_name}_bias", param(up_b))
            fused.register_parameter("down_proj_bias", param(down_b))
        if hasattr(self, "post_expert_norm"):
            fused.post_expert_norm = self.post_expert_norm
        return fused

    def __getitem__(self, e: int) -> Expert:
        return self._modules[str(e)]

    def __len__(self) -> int:
        return self.num_experts

    def experts(self) -> list[Expert]:
        return [self[e] for e in range(self.num_experts)]

    def activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The fused module's gating, on separate gate and up outputs."""
        if gate is None:
            return self.gating.act_fn(up)
        if self._default_gate:
            return self.gating.act_fn(gate) * up
        return self.gating._apply_gate(_join(gate, up, -1, self.is_concatenated))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return self._dense(hidden_states, top_k_index, top_k_weights)
        out = self._accumulator(hidden_states, top_k_weights)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        every = self.calibrate_all
        for e in range(self.num_experts) if every else hit:
            if not 0 <= e < self.num_experts:   # an expert-parallel sentinel: not on this rank
                continue
            token, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states if every else hidden_states[token])
            if every:   # every token ran through the expert; the routed ones count
                y = y[token]
            if hasattr(self, "post_expert_norm"):
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.to(hidden_states.dtype)

    @staticmethod
    def _accumulator(hidden_states, top_k_weights) -> torch.Tensor:
        """Zeros to sum the experts' weighted outputs in: the wider of the activations' and
        the routing weights' dtypes (a float32 router's weights keep a bf16 model's sum in
        float32, as transformers' grouped kernels do), rounded once at the end."""
        dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        return torch.zeros(hidden_states.shape, dtype=dtype, device=hidden_states.device)

    def _dense(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The same sum with static shapes, for graph capture (torch.export, ONNX,
        torch.compile): every expert runs on every token, weighted by its routing weight
        (zero where the token did not pick it). ``num_experts / top_k`` times the work."""
        out = self._accumulator(hidden_states, top_k_weights)
        for e in range(self.num_experts):
            w = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(-1, keepdim=True)
            y = self[e](hidden_states)
            if hasattr(self, "post_expert_norm"):
                y = self.post_expert_norm(y)
            out = out + (y * w).to(out.dtype)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, from={self.fused_type}, "
                f"gated={self.has_gate}, bias={self.has_bias}")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D weights in a layout this module reads."""
    if isinstance(module, LinearExperts) or not all(
            isinstance(getattr(module, a, None), bool) for a in _LAYOUT):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter)
            and up.dim() == 3 and down.dim() == 3)


def unfuse_experts(model: nn.Module, progress: bool = False) -> list[str]:
    """Replace every fused experts module of ``model`` with a :class:`LinearExperts`, in
    place, and return their names. The float function is unchanged (the same products in the
    same order as the fused module's eager loop). Idempotent; a model without fused experts is
    left alone. Raises :class:`UnsupportedExpertsError` before changing anything if a module
    cannot be unfused (expert-parallel sharding, a layout the weights do not fit)."""
    fused = [(n, m) for n, m in model.named_modules() if n and is_fused_experts(m)]
    for name, module in fused:   # every check first: nothing changes on a bad module
        _check(name, module)
    with torch.no_grad():
        replace_modules(model, {id(m): LinearExperts(m) for _, m in fused})
    if fused:
        logger.info("unfused %d experts module(s) into nn.Linear experts (first: %s, %d experts)",
                    len(fused), fused[0][0], model.get_submodule(fused[0][0]).num_experts)
    return [n for n, _ in fused]


def prepare_experts(model: nn.Module) -> list[str]:
    """:func:`unfuse_experts` (return the names), and a warning about expert weights that
    stay in float because their layout is not one this module reads."""
    unfused = unfuse_experts(model)
    rest = left_in_float(model)
    if rest:
        logger.warning("%d module(s) hold expert weights outside nn.Linear in a layout "
                       "modelopt_lite does not read; they stay in float: %s", len(rest),
                       ", ".join(rest[:4]) + (", ..." if len(rest) > 4 else ""))
    return unfused


def fuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Undo :func:`unfuse_experts`: put the original fused modules back (3-D weights rebuilt
    from the expert linears, in the model's own layout), in place; return their names.
    ``names`` limits it to those modules. The expert linears must be plain float
    ``nn.Linear`` layers (call :func:`modelopt_lite.unquantize` first)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)
             and (names is None or n in names)]
    for name, moe in found:
        bad = [f"{name}.{e}.{p}" for e in range(moe.num_experts)
               for p, lin in moe[e].named_children() if type(lin) is not nn.Linear]
        if bad:
            raise UnsupportedExpertsError(
                f"{bad[0]} is a {type(moe.get_submodule(bad[0][len(name) + 1:])).__name__}, not "
                "a float nn.Linear: unquantize the model (or reload it) before fusing experts")
    with torch.no_grad():
        replace_modules(model, {id(moe): moe.fuse() for _, moe in found})
    _forget_expert_records(model, [n for n, _ in found])
    return [n for n, _ in found]


def _forget_expert_records(model: nn.Module, fused: list[str]) -> None:
    """After fusing: drop the unfused flag (when no unfused experts remain) and the sparsity
    records of expert linears that no longer exist (their zeros stay in the fused weights)."""
    state = getattr(model, "_modelopt_lite", None)
    if not state or not fused:
        return
    if not has_linear_experts(model):
        state.pop("experts_unfused", None)
    sparsity = state.get("sparsity")
    if sparsity:
        inside = lambda n: any(n.startswith(f + ".") for f in fused)  # noqa: E731
        sparsity["layers"] = [r for r in sparsity["layers"] if not inside(r["name"])]


@contextmanager
def all_experts_calibrate(model: nn.Module):
    """Context: every expert of every :class:`LinearExperts` runs on every token, so the
    statistics hooks of all experts see the whole calibration set, rarely routed experts
    included; each token's output still sums only its routed experts, so the model computes
    what it computes outside. Costs ``num_experts / top_k`` times the expert work."""
    mods = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for m in mods:
        m.calibrate_all = True
    try:
        yield model
    finally:
        for m in mods:
            m.calibrate_all = False


def left_in_float(model: nn.Module) -> list[str]:
    """Names of modules that hold expert-like weights of 3 or more dimensions outside any
    ``nn.Linear`` (a MoE layout :func:`unfuse_experts` does not read): they stay in float."""
    out = []
    for name, module in model.named_modules():
        big = [p for p in module._parameters.values()
               if p is not None and p.dim() >= 3 and p.is_floating_point()]
        if big and not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and (
                "expert" in name.lower() or "expert" in type(module).__name__.lower()):
            out.append(name)
    return out


def shared_input_key(layer: nn.Module, name: str) -> str | None:
    """For the first projection (gate, or up when ungated) of expert ``e`` of a
    :class:`LinearExperts` inside ``layer`` that calibrates every expert on every token: the
    name of expert 0's same projection, which reads the very same tensor (so statistics and
    Hessians can be kept once, not once per expert). Else None."""
    path, _, proj = name.rpartition(".")
    block, _, idx = path.rpartition(".")
    if not idx.isdigit():
        return None
    try:
        moe = layer.get_submodule(block)
    except AttributeError:
        return None
    first = "gate_proj" if getattr(moe, "has_gate", False) else "up_proj"
    if not isinstance(moe, LinearExperts) or not moe.calibrate_all or proj != first:
        return None
    return f"{block}.0.{proj}"


def router_linears(model: nn.Module) -> set[str]:
    """Names of the linears inside a MoE block that score its experts: outside the experts,
    any shared expert and attention, with one output per expert (``mlp.gate.wg`` in
    HunYuan-MoE)."""
    names = set()
    for path, moe in model.named_modules():
        if not isinstance(moe, LinearExperts):
            continue
        block, _, leaf = path.rpartition(".")
        for name, m in model.get_submodule(block).named_modules():
            first = name.split(".")[0]
            if (first != leaf and "shared" not in first and "att" not in name.lower()
                    and isinstance(m, nn.Linear) and m.weight.shape[0] == moe.num_experts):
                names.add(f"{block}.{name}" if block else name)
    return names


def has_linear_experts(model: nn.Module) -> bool:
    return any(isinstance(m, LinearExperts) for m in model.modules())


# --- reading the fused layout ---

def _layout(fused: nn.Module) -> tuple[bool, bool, bool, bool]:
    return tuple(bool(getattr(fused, a)) for a in _LAYOUT)


def _num_experts(fused: nn.Module) -> int:
    return int(fused.down_proj.shape[0])


def _uses_default_gate(fused: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - only decorated (transformers) modules get here
        return False
    return getattr(type(fused), "_apply_gate", None) is _default_apply_gate


def _check(name: str, fused: nn.Module) -> None:
    has_gate, has_bias, transposed, concatenated = _layout(fused)
    if getattr(fused, "_is_expert_parallel", False):
        raise UnsupportedExpertsError(
            f"{name}: the experts are sharded across ranks (expert parallelism); quantize the "
            "model with every expert on each rank (load it without an expert-parallel plan)")
    e = _num_experts(fused)
    up = fused.gate_up_proj if has_gate else fused.up_proj
    if up.is_meta:
        raise UnsupportedExpertsError(
            f"{name}: the fused experts are on the meta device. Streaming a MoE model from a "
            "safetensors folder (load_streaming) is not supported yet: load the model in CPU "
            "memory and calibrate with stream_layers(model, 'cuda') instead")
    down = fused.down_proj
    up_in, up_out = (up.shape[1], up.shape[2]) if transposed else (up.shape[2], up.shape[1])
    down_in, down_out = (down.shape[1], down.shape[2]) if transposed else (down.shape[2],
                                                                             down.shape[1])
    inter = up_out // 2 if has_gate else up_out
    problems = []
    if up.shape[0] != e:
        problems.append(f"{e} experts in down_proj but {up.shape[0]} in the up projection")
    if has_gate and up_out % 2:
        problems.append(f"gate_up_proj has an odd number of outputs ({up_out})")
    if down_in != inter:
        problems.append(f"down_proj reads {down_in} features, the gating makes {inter}")
    if not has_gate and not hasattr(fused, "act_fn"):
        problems.append("an ungated experts module without act_fn")
    if has_gate and not hasattr(fused, "act_fn") and _uses_default_gate(fused):
        problems.append("the default gating needs act_fn")
    if has_bias:
        for bias, width in ((("gate_up_proj_bias" if has_gate else "up_proj_bias"), up_out),
                            ("down_proj_bias", down_out)):
            b = getattr(fused, bias, None)
            if b is None or tuple(b.shape) != (e, width):
                problems.append(f"{bias} should be [{e}, {width}]")
    if up_in != down_out:
        problems.append(f"the experts read {up_in} features but write {down_out}")
    if problems:
        raise UnsupportedExpertsError(
            f"{name} ({type(fused).__name__}): cannot unfuse its experts: "
            f"{'; '.join(problems)}. Exclude the layer from quantization or report the model")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    """An ``nn.Linear`` owning a copy of one expert's ``[out, in]`` (or ``[in, out]``) slice."""
    w = weight.t() if transposed else weight
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(),
                                requires_grad=bias.requires_grad)
    return lin


def _part(t: torch.Tensor, dim: int, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of a fused gate/up tensor along ``dim``: ``[gate; up]`` when
    concatenated, else interleaved ``[g0, u0, g1, u1, ...]``. Inverse of :func:`_join`."""
    if concatenated:
        return t.chunk(2, dim)
    dim %= t.dim()
    return t.unflatten(dim, (-1, 2)).unbind(dim + 1)


def _join(gate: torch.Tensor, up: torch.Tensor, dim: int, concatenated: bool) -> torch.Tensor:
    """Gate and up outputs (or weights) laid out along ``dim`` as the fused module has them."""
    if concatenated:
        return torch.cat((gate, up), dim)
    dim %= gate.dim()
    return torch.stack((gate, up), dim + 1).flatten(dim, dim + 1)


def _split(fused: nn.Module, n: int, layout) -> list[tuple]:
    has_gate, has_bias, transposed, concatenated = layout
    up_w = fused.gate_up_proj if has_gate else fused.up_proj
    up_b = (fused.gate_up_proj_bias if has_gate else fused.up_proj_bias) if has_bias else None
    down_b = fused.down_proj_bias if has_bias else None
    out_dim = 2 if transposed else 1            # the output-feature dim of the 3-D weight
    experts = []
    for e in range(n):
        w, b = up_w[e], None if up_b is None else up_b[e]
        gate = None
        if has_gate:
            gw, uw = _part(w, out_dim - 1, concatenated)
            gb, ub = (None, None) if b is None else _part(b, 0, concatenated)
            gate, w, b = _linear(gw, gb, transposed), uw, ub
        up = _linear(w, b, transposed)
        down = _linear(fused.down_proj[e], None if down_b is None else down_b[e], transposed)
        experts.append((gate, up, down))
    return experts
