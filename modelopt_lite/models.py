"""Model support as data: which producer (a norm or a linear) feeds which linears, per architecture.

SmoothQuant and AWQ divide a producer's output channels by a scale ``s`` and multiply the
consuming linears' input columns by ``s``; the float model's output is unchanged. The table
below says, per Hugging Face ``model_type``, where the decoder layers live and which
``(producer, consumers, block)`` groups exist inside one layer (names relative to the layer).
``block`` names the module whose output error a search minimises.

To add an architecture, add one row to ``ARCHITECTURES``::

    "mymodel": Arch("model.layers", (
        Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attn"),
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )),

An architecture not in the table falls back to scaling each linear on its own, with the scale
kept as an explicit multiply (``pre_quant_scale``) in front of the linear.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .nn.functional import rotate_blocks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """Linears that share one input, the module producing that input, and the block to score.

    ``kv_heads``: for ``v_proj -> o_proj``, the attention module whose key/value heads are
    repeated for grouped-query attention. Then ``o_proj`` reads each ``v_proj`` channel
    ``num_key_value_groups`` times (once per query head of the group), so the scale is tied
    across those copies and folds into ``v_proj``'s rows exactly.

    ``act``: for a linear producer whose output reaches the linears through an activation
    (``fc1 -> act -> fc2``), that activation module; the group folds only when it is
    positively homogeneous (ReLU: ``relu(x / s) = relu(x) / s`` for ``s > 0``).
    """

    prev: str | None
    linears: tuple[str, ...]
    block: str | None = None
    kv_heads: str | None = None
    act: str | None = None


@dataclass(frozen=True)
class Arch:
    """``post_norms``: ``(block, norm)`` pairs for architectures that normalize a block's output
    per token before adding it to the residual stream (Gemma 2/3's sandwich norms); a search
    scoring that block measures its error after the norm, as the residual stream receives it."""

    layers: str
    groups: tuple[Group, ...]
    post_norms: tuple[tuple[str, str], ...] = ()


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_V_O = Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", kv_heads="self_attn")
_LLAMA = Arch("model.layers", (
    Group("input_layernorm", _ATTN, "self_attn"),
    _V_O,
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
))
_GEMMA2 = Arch("model.layers", (
    Group("input_layernorm", _ATTN, "self_attn"),
    _V_O,
    Group("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
), post_norms=(("self_attn", "post_attention_layernorm"),
               ("self_attn.o_proj", "post_attention_layernorm"),
               ("mlp", "post_feedforward_layernorm"),
               ("mlp.down_proj", "post_feedforward_layernorm")))

# Mixture-of-experts decoders with Llama-named attention: the attention groups (and the dense
# MLP of layers that have one) fold as in Llama; a shared expert's up -> down folds. The MoE
# input norm also feeds the router, so it folds nothing; the routed experts' groups come from
# ``expert_groups`` (one set per expert, see there).
_LLAMA_MOE = Arch("model.layers", _LLAMA.groups + tuple(
    Group(f"mlp.{shared}.up_proj", (f"mlp.{shared}.down_proj",), f"mlp.{shared}.down_proj")
    for shared in ("shared_expert", "shared_experts")))

# DeepSeek-V2/V3 multi-head latent attention: the input norm feeds the query (low-rank or full)
# and the joint key/value down-projection.
_DEEPSEEK = Arch("model.layers", _LLAMA_MOE.groups + (
    Group("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn"),
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn"),
))

# T5-family blocks: ``layer.0`` self-attention, then (decoder) ``layer.1`` cross-attention, then
# the feed-forward (``layer.1`` in the encoder, ``layer.2`` in the decoder); a layer keeps the
# groups whose modules it has. The feed-forward folds ``wi_1 -> wo`` where gated (linear in
# ``wi_1``) and ``wi -> relu -> wo`` (T5 v1.0); another activation's ``wo`` and the
# cross-attention's key/value (fed by the encoder's output, produced outside the layer) get
# explicit multiplies.
def _t5_groups() -> tuple[Group, ...]:
    attn, cross = "layer.0.SelfAttention", "layer.1.EncDecAttention"
    groups = [Group("layer.0.layer_norm", (f"{attn}.q", f"{attn}.k", f"{attn}.v"), attn),
              Group(f"{attn}.v", (f"{attn}.o",), f"{attn}.o"),
              Group("layer.1.layer_norm", (f"{cross}.q",), cross),
              Group(None, (f"{cross}.k", f"{cross}.v"), cross),
              Group(f"{cross}.v", (f"{cross}.o",), f"{cross}.o")]
    for i in (1, 2):
        ff = f"layer.{i}.DenseReluDense"
        groups += [Group(f"layer.{i}.layer_norm", (f"{ff}.wi",), ff),
                   Group(f"layer.{i}.layer_norm", (f"{ff}.wi_0", f"{ff}.wi_1"), ff),
                   Group(f"{ff}.wi_1", (f"{ff}.wo",), f"{ff}.wo"),
                   Group(f"{ff}.wi", (f"{ff}.wo",), f"{ff}.wo", act=f"{ff}.act"),
                   Group(None, (f"{ff}.wo",), f"{ff}.wo")]
    return tuple(groups)


_T5 = Arch("decoder.block", _t5_groups())

# Pre-norm BART-family encoder-decoders (Whisper, mBART, Pegasus, M2M-100, Blenderbot): the
# encoder layers have the self-attention and MLP groups, the decoder layers also the
# cross-attention's. ``fc1 -> act -> fc2`` folds through ReLU (M2M-100, NLLB); under another
# activation fc2 gets an explicit multiply, as do the cross-attention's key/value. (Post-norm
# BART, Marian and FSMT normalise after the residual add: a norm's output is the residual
# stream too, so no scale folds into it, and they keep per-linear scales.)
_PRE_NORM_SEQ2SEQ = Arch("model.decoder.layers", (
    Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn"),
    Group("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    Group("encoder_attn_layer_norm", ("encoder_attn.q_proj",), "encoder_attn"),
    Group(None, ("encoder_attn.k_proj", "encoder_attn.v_proj"), "encoder_attn"),
    Group("encoder_attn.v_proj", ("encoder_attn.out_proj",), "encoder_attn.out_proj"),
    Group("final_layer_norm", ("fc1",), "fc1"),
    Group("fc1", ("fc2",), "fc2", act="activation_fn"),
    Group(None, ("fc2",), "fc2"),
))

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    **{t: _LLAMA_MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe",
                               "gpt_oss", "granitemoe", "minimax", "hunyuan_v1_moe")},
    "deepseek_v2": _DEEPSEEK, "deepseek_v3": _DEEPSEEK,
    "gemma2": _GEMMA2, "gemma3": _GEMMA2, "gemma3_text": _GEMMA2,
    "phi3": Arch("model.layers", (
        Group("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        Group("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    )),
    "opt": Arch("model.decoder.layers", (
        Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj",
                                       "self_attn.v_proj"), "self_attn"),
        Group("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        Group("final_layer_norm", ("fc1",), "fc1"),
        Group("fc1", ("fc2",), "fc2", act="activation_fn"),
    )),
    "gpt2": Arch("transformer.h", (
        Group("ln_1", ("attn.c_attn",), "attn"),
        Group("ln_2", ("mlp.c_fc",), "mlp"),
    )),
    "gpt_neox": Arch("gpt_neox.layers", (
        Group("input_layernorm", ("attention.query_key_value",), "attention"),
        Group("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    )),
    **{t: _T5 for t in ("t5", "mt5", "umt5")},
    **{t: _PRE_NORM_SEQ2SEQ for t in ("whisper", "mbart", "pegasus", "m2m_100", "blenderbot")},
}


class UnsupportedModelError(ValueError):
    """The model's decoder layers cannot be found."""


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model``'s config says encoder-decoder (T5, BART, Whisper, ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_generative(model: nn.Module) -> bool:
    """A Hugging Face model that predicts tokens (causal, multimodal or encoder-decoder: a
    ``GenerationMixin`` or ``<Arch>ForCausalLM``), not a classifier or a headless encoder."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return "GenerationMixin" in names or type(model).__name__.endswith("ForCausalLM")


def _text_config(model: nn.Module):
    """The language model's config inside a multimodal model's config (Llava, Gemma 3,
    Qwen2-VL, ...); None for a model that is a language model itself."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    if not callable(get) or getattr(cfg, "is_encoder_decoder", False):
        return None
    try:
        text = get(decoder=True)
    except (TypeError, ValueError):
        return None
    return text if text is not None and text is not cfg else None


def get_arch(model: nn.Module) -> Arch | None:
    """The table row of ``model``'s type; for a multimodal model whose type has no row, the row
    of its language model's type (the groups are relative to a decoder layer, wherever the
    layers live)."""
    kind = model_type(model)
    if kind not in ARCHITECTURES:
        kind = getattr(_text_config(model), "model_type", None)
    arch = ARCHITECTURES.get(kind)
    if arch is not None and kind == "opt" and not getattr(
            _text_config(model) or model.config, "do_layer_norm_before", True):
        return None  # post-norm OPT (350m): the norms do not feed the linears
    return arch


def language_model_path(model: nn.Module) -> str:
    """Where a multimodal model keeps its language model (``model.language_model`` in Llava,
    Gemma 3, Qwen2-VL, ...), from ``get_decoder()``; '' for a language model itself."""
    if _text_config(model) is None or not callable(getattr(model, "get_decoder", None)):
        return ""
    try:
        decoder = model.get_decoder()
    except Exception:  # noqa: BLE001 - a model's own accessor; the whole model is the fallback
        return ""
    return _path_of(model, decoder) or ""


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of ``module`` inside ``model`` (None if absent or ``model`` itself)."""
    return next((n for n, m in model.named_modules() if m is module and n), None)


def _block_lists(model: nn.Module, under: str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """(path, ModuleList) of every non-empty ModuleList of identical blocks that hold a linear
    or a Conv2d (a CNN's stages; not MarkupLM's fifty XPath embedding tables, nor blocks of
    1-D convs alone: a speech encoder's positional convolution, whose five small blocks must
    not outrank a short encoder), inside the module at path ``under`` when given."""
    return [(n, m) for n, m in model.named_modules()
            if (under is None or n.startswith(under + ".")) and isinstance(m, nn.ModuleList)
            and len(m) > 0 and len({type(x) for x in m}) == 1
            and any(_is_linear(x) or isinstance(x, nn.Conv2d) for x in m[0].modules())]


# sub-configs of other inputs, by attribute name (BLT builds its text blocks from sub-configs
# named encoder/global/decoder/patcher: those are the language model)
_OTHER_INPUTS = ("vision", "visual", "image", "audio", "speech", "vq", "qformer", "perceiver")


def other_input_paths(model: nn.Module) -> list[str]:
    """Paths of the modules a multimodal model builds from a sub-config other than its text
    config (``vision_config``, ``audio_config``, ...): its encoders of other inputs, wherever
    they sit (GIT keeps its language layers at the top and the image encoder beside them)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return []
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return []
    text = _text_config(model)
    subs = [v for k, v in vars(cfg).items() if isinstance(v, PretrainedConfig)
            and v is not text and any(word in k for word in _OTHER_INPUTS)]
    paths: list[str] = []
    for name, module in model.named_modules():
        owner = getattr(module, "config", None)
        if name and owner is not None and any(owner is sub for sub in subs) and not any(
                name.startswith(p + ".") for p in paths):
            paths.append(name)
    return paths


class OtherModalities:
    """Layers of a multimodal model outside its language model (vision / audio encoders, the
    projectors into the text stream) stay in float: text calibration never runs them, and they
    are a small part of the weights. A config whose ``targets`` lack ``"*"`` names what it
    wants and takes them; with ``"*"`` the rule stands for every layer the other patterns do
    not match (``("*", "vision_tower.blocks.0.mlp.fc1")`` adds that one layer)."""

    def __init__(self, model: nn.Module, lm_path: str, encoders: list[str], named=()):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.prefix = lm_path + "." if lm_path else None
        self.encoders = tuple(p + "." for p in encoders)
        self.heads = {_path_of(model, head)} if head is not None else set()
        self.named = tuple(named)   # targets besides "*": what the user asked for by name
        where = f"outside the language model ({lm_path})" if lm_path else "in an encoder of " \
            f"another input ({', '.join(encoders)})"
        self.reason = (f"{where} of a multimodal model: encoders and projectors of other "
                       "inputs stay in float (name them in targets to include them)")

    def __call__(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.named):
            return False
        if (name + ".").startswith(self.encoders):
            return True
        return self.prefix is not None and not name.startswith(self.prefix) and (
            name not in self.heads)


def other_modalities(model: nn.Module, targets) -> OtherModalities | None:
    """The rule for ``model``'s layers outside its language model, or None when ``model`` is a
    language model itself or ``targets`` (fnmatch patterns) do not include ``"*"``."""
    if "*" not in tuple(targets):
        return None
    path, encoders = language_model_path(model), other_input_paths(model)
    try:   # never the module that holds the decoder stack
        stack = find_decoder_layers(model)[0] + "."
        encoders = [e for e in encoders if not stack.startswith(e + ".")]
    except UnsupportedModelError:
        pass
    named = [t for t in targets if t != "*"]
    return OtherModalities(model, path, encoders, named) if path or encoders else None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder layers: from the table, else the longest ModuleList of
    identical blocks, inside the language model of a multimodal model (a vision tower's
    blocks are never the stack that text calibration runs through)."""
    arch = get_arch(model)
    if arch is not None:
        try:
            return arch.layers, model.get_submodule(arch.layers)
        except AttributeError:
            pass
    stacks = _candidate_lists(model)
    return _longest(model, stacks, _stage_list(stacks))


def _longest(model: nn.Module, stacks, stages) -> tuple[str, nn.ModuleList]:
    """The longest of the candidate ``stacks``, never the list of ``stages`` (its blocks'
    inputs change shape from one to the next)."""
    best = max([nm for nm in stacks if nm[1] is not stages] or stacks,
               key=lambda nm: len(nm[1]), default=None)
    if best is None:
        raise UnsupportedModelError(
            f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of "
            "identical blocks. Add a row to modelopt_lite.models.ARCHITECTURES (see its docstring)")
    return best


# Outputs of a layer that its stack passes to the next layers: (output index, positional
# argument index or keyword name). T5's first layer computes the relative position biases
# (self-attention, and cross-attention in the decoder) and every later layer reuses them;
# so does WavLM's, by keyword.
_T5_SHARED = ((1, 2), (2, 5))
SHARED_LAYER_OUTPUTS: dict[str, tuple[tuple[int, int | str], ...]] = {
    "t5": _T5_SHARED, "mt5": _T5_SHARED, "switch_transformers": _T5_SHARED,
    "longt5": ((1, 2), (3, 5)), "wavlm": ((1, "position_bias"),),
}


def shared_layer_outputs(model: nn.Module) -> tuple[tuple[int, int | str], ...]:
    """``(output index, argument index)`` pairs of :data:`SHARED_LAYER_OUTPUTS` for ``model``."""
    return SHARED_LAYER_OUTPUTS.get(model_type(model), ())


def _under(name: str, paths) -> bool:
    """Whether module path ``name`` is one of ``paths`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def _candidate_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The block lists that may be the stack: inside the language model of a multimodal
    model, never inside its encoders of other inputs."""
    stacks = _block_lists(model)
    scope, encoders = language_model_path(model), tuple(p + "." for p in other_input_paths(model))
    if scope:
        stacks = [(n, m) for n, m in stacks if n.startswith(scope + ".")] or stacks
    if encoders:
        stacks = [(n, m) for n, m in stacks if not n.startswith(encoders)] or stacks
    return stacks


def _stage_list(stacks) -> nn.ModuleList | None:
    """A hierarchical model's list of stages (PVT, FocalNet, Swin, ResNet: blocks of one type
    whose widths differ from stage to stage, each holding a list of blocks of its own), the
    outermost such list; None for a model without one."""
    for name, stages in sorted(stacks, key=lambda nm: len(nm[0])):
        if len({tuple(p.shape for p in b.parameters()) for b in stages}) < 2:
            continue
        if all(any(_under(n, (f"{name}.{j}",)) for n, _ in stacks) for j in range(len(stages))):
            return stages
    return None


def _stage_stacks(stacks, stages) -> list[tuple[str, nn.ModuleList]] | None:
    """The block list of each stage of a hierarchical model's list of ``stages`` (see
    :func:`_stage_list`) among the candidate ``stacks``, in order, when every stage holds
    blocks that are modules of their own."""
    if stages is None:
        return None
    name = next(n for n, m in stacks if m is stages)
    out = []
    for j in range(len(stages)):
        inner = [(n, m) for n, m in stacks if _under(n, (f"{name}.{j}",))]   # PVT: the stage
        best = min(inner, key=lambda nm: (nm[0].count("."), -len(nm[1])))   # the outermost
        if not any(True for _ in best[1][0].children()):   # bare linears, not blocks
            return None
        out.append(best)
    return out


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The layer stacks layer-by-layer calibration walks, in the order the forward runs them:
    an encoder-decoder model's encoder layers, then its decoder layers (T5, BART, ...), or a
    hierarchical vision model's stages' blocks (PVT, Swin, ResNet, ...), each calibrated on
    the outputs of the stacks before it; else the one decoder stack
    (:func:`find_decoder_layers`)."""
    if not is_encoder_decoder(model):
        if get_arch(model) is not None:
            return [find_decoder_layers(model)]
        stacks = _candidate_lists(model)
        stages = _stage_list(stacks)
        return _stage_stacks(stacks, stages) or [_longest(model, stacks, stages)]
    first = find_decoder_layers(model)
    stacks = []
    for getter in ("get_encoder", "get_decoder"):
        try:
            part = getattr(model, getter)()
        except Exception:  # noqa: BLE001 - a model's own accessor; one stack is the fallback
            return [first]
        path = _path_of(model, part)
        lists = _block_lists(model, path) if path else []
        if not lists:
            return [first]
        stacks.append(max(lists, key=lambda nm: len(nm[1])))
    return stacks if stacks[0][1] is not stacks[1][1] else [first]


def calibration_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` in the order layer-by-layer calibration processes them: each layer
    of :func:`layer_stacks` as ``"{path}.{i}"``, or ``("", model)`` for a model without a
    stack of identical blocks (a plain CNN or MLP), which is processed whole."""
    try:
        stacks = layer_stacks(model)
    except UnsupportedModelError:
        return [("", model)]
    return [(f"{path}.{i}", layer) for path, layers in stacks for i, layer in enumerate(layers)]


def layer_groups(model: nn.Module, layer: nn.Module, kv_tied: bool = False) -> list[Group]:
    """The scale groups of one decoder layer that exist and fold exactly; else per-linear groups.
    ``kv_tied``: include groups that fold only with a scale tied over repeated key/value heads
    (``v_proj -> o_proj`` under grouped-query attention, see :func:`tie_scale`)."""
    arch = get_arch(model)
    experts = expert_groups(layer)
    if arch is None:
        kind = model_type(model) or type(model).__name__
        # once a model (not for each of its layers); a model processed whole (no stack of
        # blocks: a plain CNN) has no row to add
        if getattr(model, "_modelopt_lite_no_row_noted", None) != kind:
            model._modelopt_lite_no_row_noted = kind
            logger.log(logging.INFO if layer is model else logging.WARNING,
                       "%s is not in modelopt_lite.models.ARCHITECTURES: each linear is scaled "
                       "on its own with an explicit multiply (no fold). Add a row to fold "
                       "scales.", kind)
        covered = {n for g in experts for n in g.linears}
        return [Group(None, (n,), n) for n, m in layer.named_modules()
                if _is_linear(m) and n not in covered] + experts
    routed, groups, covered = _routed_blocks(layer), [], set()
    for g in arch.groups:   # a row's explicit multiply only for linears no fold covers
        if (_group_ok(layer, g, kv_tied) and not _feeds_a_router(layer, g, routed)
                and not covered.intersection(g.linears)):
            groups.append(g)
            covered.update(g.linears)
    return groups + experts


def _routed_blocks(layer: nn.Module) -> set[str]:
    """Paths of the modules that hold routed experts (the MoE blocks) inside ``layer``."""
    from .moe import LinearExperts

    return {n.rpartition(".")[0] for n, m in layer.named_modules()
            if isinstance(m, LinearExperts)}


def _feeds_a_router(layer: nn.Module, group: Group, routed: set[str]) -> bool:
    """A norm producer whose consumers sit in a MoE block also feeds its router and experts:
    dividing it would change the routing, so such a group cannot fold."""
    prev = _get(layer, group.prev)
    return prev is not None and not _is_linear(prev) and any(
        lin.startswith(block + ".") for block in routed for lin in group.linears)


def expert_groups(layer: nn.Module) -> list[Group]:
    """The groups of every routed expert (:class:`~modelopt_lite.moe.LinearExperts`) inside
    ``layer``: its gate and up projections share the expert's input, scaled by an explicit
    multiply (the input also feeds the router and the other experts, so nothing upstream can
    fold an expert's scale); up -> down folds exactly into the up projection's rows when the
    gating is ``act(gate) * up`` (linear in ``up``), else down gets an explicit multiply."""
    from .moe import LinearExperts

    groups = []
    for path, moe in layer.named_modules():
        if not isinstance(moe, LinearExperts):
            continue
        for e, expert in enumerate(moe.experts()):
            p = f"{path}.{e}"
            inputs = (f"{p}.gate_proj", f"{p}.up_proj") if moe.has_gate else (f"{p}.up_proj",)
            groups.append(Group(None, inputs, p))
            linear_in_up = moe.has_gate and moe._default_gate
            groups.append(Group(f"{p}.up_proj" if linear_in_up else None, (f"{p}.down_proj",),
                                f"{p}.down_proj"))
    return groups


def block_post_norm(model: nn.Module, layer: nn.Module, block: str | None) -> nn.Module | None:
    """The norm that ``block``'s output passes through before the residual add, when the
    architecture table names one (see ``Arch.post_norms``) and the layer has it; else None."""
    arch = get_arch(model)
    names = dict(arch.post_norms) if arch is not None else {}
    return _get(layer, names.get(block))


def _get(layer: nn.Module, name: str | None):
    if name is None:
        return None
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _group_ok(layer: nn.Module, group: Group, kv_tied: bool = False) -> bool:
    linears = [_get(layer, n) for n in group.linears]
    if any(m is None for m in linears):
        return False
    if group.prev is None:   # an explicit multiply in front of the linears
        return True
    prev = _get(layer, group.prev)
    if prev is None:
        return False
    if group.act is not None and not _positively_homogeneous(_get(layer, group.act)):
        return False
    if _is_linear(prev):  # a linear producer must emit exactly the consumers' input channels
        return (out_features(prev) == in_features(linears[0])
                or kv_tied and kv_repeat(layer, group) is not None)
    return True


def _positively_homogeneous(act) -> bool:
    """``act(x / s) == act(x) / s`` for every ``s > 0``: ReLU, leaky ReLU, identity."""
    return isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.Identity))


def kv_repeat(layer: nn.Module, group: Group) -> tuple[int, int] | None:
    """``(repeats, head_dim)`` when the group's producer feeds repeated key/value heads (GQA):
    consumer input channel ``h * head_dim + d`` reads producer channel
    ``(h // repeats) * head_dim + d``. None otherwise."""
    attn = _get(layer, group.kv_heads)
    prev, first = _get(layer, group.prev), _get(layer, group.linears[0])
    if attn is None or prev is None or first is None or not _is_linear(prev):
        return None
    r, hd = getattr(attn, "num_key_value_groups", None), getattr(attn, "head_dim", None)
    if not isinstance(r, int) or not isinstance(hd, int) or r <= 1 or hd <= 0:
        return None
    produced = out_features(prev)
    return (r, hd) if produced % hd == 0 and produced * r == in_features(first) else None


def tie_scale(layer: nn.Module, group: Group, s: torch.Tensor) -> torch.Tensor:
    """Project consumer-side scales (``[..., in]``) onto what the producer can fold: under
    GQA, the geometric mean over each channel's repeated copies, repeated back; else ``s``."""
    rep = kv_repeat(layer, group)
    if rep is None:
        return s
    r, hd = rep
    lead = s.shape[:-1]
    tied = s.float().clamp(min=1e-12).log().reshape(*lead, -1, r, hd).mean(-2, keepdim=True)
    return tied.exp().expand(*lead, tied.shape[-3], r, hd).reshape(s.shape).to(s.dtype)


def _producer_scale(layer: nn.Module, group: Group, s: torch.Tensor) -> torch.Tensor:
    """The scale on the producer's own channels (one copy of each repeated GQA channel)."""
    rep = kv_repeat(layer, group)
    if rep is None:
        return s
    r, hd = rep
    copies = s.reshape(-1, r, hd)
    if not torch.allclose(copies, copies[:, :1].expand_as(copies), rtol=1e-5, atol=0):
        raise ValueError(f"{group.prev} -> {group.linears}: the scale differs between the "
                         "copies of a repeated key/value head, so it cannot fold; pass it "
                         "through models.tie_scale first")
    return copies[:, 0].reshape(-1)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "QuantConv1D")


def _is_conv1d(m: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" for c in type(m).__mro__)


def in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if _is_conv1d(m) else m.weight.shape[1]


def out_features(m: nn.Module) -> int:
    return m.weight.shape[1] if _is_conv1d(m) else m.weight.shape[0]


# --- exact folding ---

def _is_gemma_norm(norm: nn.Module) -> bool:
    return "Gemma" in type(norm).__name__ and "RMSNorm" in type(norm).__name__


@torch.no_grad()
def scale_linear_inputs_(linear: nn.Module, s: torch.Tensor) -> None:
    """Multiply the linear's input columns by ``s`` (its input will be divided by ``s``)."""
    w = linear.weight
    if _is_conv1d(linear):
        w.mul_(s.to(w.dtype)[:, None])
    else:
        w.mul_(s.to(w.dtype)[None, :])


@torch.no_grad()
def rotate_linear_input_(linear: nn.Module, r: torch.Tensor) -> None:
    """Rotate a quantized linear's input online by the orthogonal block ``r`` and its weight's
    input columns by the same blocks, so ``(x R)(W R)^T = x W^T`` and the float function stays.
    The input quantizer then sees ``x R``, whose outliers are spread over ``r.shape[0]``
    channels."""
    quantizer = getattr(linear, "input_quantizer", None)
    name = getattr(quantizer, "name", type(linear).__name__)
    if quantizer is None or not hasattr(linear, "weight_2d"):
        raise UnsupportedModelError(f"{name}: an online rotation needs a quantized linear")
    if linear.mask_2d() is not None:
        raise UnsupportedModelError(f"{name}: rotating the input of a 2:4-sparse layer would "
                                    "destroy its sparsity pattern; do not rotate sparse layers")
    if quantizer.rotation is not None or quantizer.pre_quant_scale is not None:
        raise UnsupportedModelError(f"{name}: the input is already rotated or scaled; rotate "
                                    "before any explicit smoothing multiply")
    _rotate_weight_columns_(linear, r)
    quantizer.set_rotation(r)
    wq = linear.weight_quantizer
    if getattr(wq, "amax", None) is not None:
        wq.init_from_weight(linear.weight_2d())


@torch.no_grad()
def unrotate_linear_input_(linear: nn.Module) -> None:
    """Undo :func:`rotate_linear_input_` into the weight: ``W R^T`` (after any pre-quant
    scale was folded into it), and drop the online rotation."""
    quantizer = linear.input_quantizer
    r = quantizer.rotation
    if r is None:
        return
    _rotate_weight_columns_(linear, r.t())
    quantizer.set_rotation(None)


def _rotate_weight_columns_(linear: nn.Module, r: torch.Tensor) -> None:
    """``W -> W diag(r, ..., r)`` on the weight's input columns, in float32."""
    w2d = linear.weight_2d()
    rotated = rotate_blocks(w2d.detach().float(), r.float()).to(w2d.dtype)
    linear.weight.copy_(linear.weight_from_2d(rotated))


@torch.no_grad()
def divide_producer_(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s``: a norm's weight (and bias) or a linear's rows."""
    if _is_linear(prev):
        w = prev.weight
        if _is_conv1d(prev):
            w.div_(s.to(w.dtype)[None, :])
        else:
            w.div_(s.to(w.dtype)[:, None])
    elif _is_gemma_norm(prev):  # y = norm(x) * (1 + w)
        prev.weight.copy_(((1.0 + prev.weight.double()) / s.double() - 1.0).to(prev.weight.dtype))
    elif getattr(prev, "weight", None) is not None:
        prev.weight.div_(s.to(prev.weight.dtype))
    else:
        raise UnsupportedModelError(f"cannot fold a scale into {type(prev).__name__}: no weight")
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


@torch.no_grad()
def apply_group_scale_(layer: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Fold ``s`` exactly: producer / s, consumers' inputs * s; or an explicit multiply."""
    s = s.float()
    prev = _get(layer, group.prev)
    s_prev = None if prev is None else _producer_scale(layer, group, s)  # checks before changes
    for name in group.linears:
        scale_linear_inputs_(layer.get_submodule(name), s)
    if prev is not None:
        divide_producer_(prev, s_prev.to(prev.weight.device))
        return
    for name in group.linears:  # no producer: keep x / s as an explicit multiply
        _set_input_multiplier(layer.get_submodule(name), 1.0 / s)


def _set_input_multiplier(linear: nn.Module, mult: torch.Tensor) -> None:
    quantizer = getattr(linear, "input_quantizer", None)
    if quantizer is None:
        raise UnsupportedModelError(
            f"{type(linear).__name__}: an unfolded scale needs a quantized layer to hold it")
    old = quantizer.pre_quant_scale
    quantizer.set_pre_quant_scale(mult if old is None else old * mult)
