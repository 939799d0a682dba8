"""``nn.MultiheadAttention`` unpacked into four ``nn.Linear`` layers.

``torch.nn.MultiheadAttention`` keeps its query/key/value projections in one packed
``in_proj_weight`` (or three bare ``*_proj_weight`` parameters) and reads them, and
``out_proj.weight``, inside ``F.multi_head_attention_forward``: no ``nn.Linear`` is ever
called, so a quantizer that wraps linears leaves the whole attention in float
(``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, torchvision's ViT, OpenCLIP,
the attention-pooling heads of SigLIP, Idefics2 and Aria in transformers). Worse, in eval mode
under ``torch.no_grad()`` ``nn.TransformerEncoderLayer`` takes a fused fast path that reads
``linear1.weight`` / ``linear2.weight`` directly, so even its quantized feed-forward layers ran
in float there.

:func:`unpack_attention` replaces every ``nn.MultiheadAttention`` with
:class:`LinearMultiheadAttention`: the same forward signature and outputs, with ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` plain ``nn.Linear`` children, so fake quant, AWQ and
SmoothQuant, 2:4 sparsity, ``deploy()``'s ``Int4Linear`` and the Q/DQ export apply to each.
It also turns the transformer layers' fused fast path off (its weights would bypass the
quantizers). Attention modules of other libraries that hand their linears' weights to
``F.multi_head_attention_forward`` (transformers' WavLM) get the same computation through the
linears, by a stand-in for that method on each instance. :func:`pack_attention` undoes both.

:func:`~modelopt_lite.quantize` and :func:`~modelopt_lite.sparsify` call this themselves;
:func:`~modelopt_lite.load` replays it for checkpoints saved from an unpacked model.

Example::

    from modelopt_lite.attention import unpack_attention
    unpack_attention(model)      # in place; the model's outputs do not change
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .nn.quant_modules import is_quantized
from .nn.replace import replace_modules

logger = logging.getLogger(__name__)

_PACKED = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class LinearMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention``: ``forward(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)`` returns
    ``(output, weights or None)`` as the original does, batch-first or not, batched or not,
    with ``bias_k`` / ``bias_v``, ``add_zero_attn``, boolean or float masks and dropout. The
    projections are ``q_proj`` (``embed_dim -> embed_dim``), ``k_proj`` (``kdim ->``),
    ``v_proj`` (``vdim ->``) and ``out_proj``. A state dict of the packed module
    (``in_proj_weight`` ...) loads into it too."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.batch_first, self.dropout, self.add_zero_attn = (mha.batch_first, mha.dropout,
                                                              mha.add_zero_attn)
        # read by nn.TransformerEncoderLayer's fast-path checks: None / False turn it off
        self.in_proj_weight = self.in_proj_bias = None
        self._qkv_same_embed_dim = False
        weights = ((mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e],
                    mha.in_proj_weight[2 * e:]) if mha._qkv_same_embed_dim else
                   (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        biases = (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None
                  else (None, None, None))
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            self.add_module(name, _linear(w, b))
        self.out_proj = mha.out_proj
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        self.train(mha.training)
        # the original module, emptied, for pack(): its packed parameters keep their identity
        # (an optimizer's references stay good) but give up their storage meanwhile
        originals = {n: mha._parameters.pop(n) for n in _PACKED if n in mha._parameters}
        for param in originals.values():
            if param is not None:
                param.data = param.data.new_empty(0)
        for name in ("bias_k", "bias_v"):
            mha._parameters.pop(name, None)
        del mha._modules["out_proj"]
        self.__dict__["_packed"] = mha   # plain attributes: not children, not in state dicts
        self.__dict__["_originals"] = originals
        for hooks in _HOOK_DICTS:   # hooks on the module keep firing (shared, so pack keeps
            if hooks in mha.__dict__:   # those added meanwhile)
                self.__dict__[hooks] = mha.__dict__[hooks]
        self._register_load_state_dict_pre_hook(_split_packed_keys, with_module=True)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        return attend(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                      average_attn_weights, is_causal, batch_first=self.batch_first,
                      bias_k=self.bias_k, bias_v=self.bias_v, add_zero_attn=self.add_zero_attn,
                      dropout=self.dropout)

    @torch.no_grad()
    def pack(self) -> nn.MultiheadAttention:
        """The original ``nn.MultiheadAttention`` with its packed weights rebuilt from the
        linears (which must be plain float ``nn.Linear`` layers)."""
        mha = self._packed
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        trains = q.weight.requires_grad
        # torch's order; the unused ones are registered as None, as torch does
        packed = dict.fromkeys(_PACKED if mha._qkv_same_embed_dim
                                else _PACKED[1:4] + _PACKED[:1] + _PACKED[4:])
        if mha._qkv_same_embed_dim:
            packed["in_proj_weight"] = torch.cat([q.weight, k.weight, v.weight])
        else:
            packed.update(q_proj_weight=q.weight.clone(), k_proj_weight=k.weight.clone(),
                          v_proj_weight=v.weight.clone())
        if q.bias is not None:
            packed["in_proj_bias"] = torch.cat([q.bias, k.bias, v.bias])
        originals = self._originals
        for name, t in packed.items():
            mha.__dict__.pop(name, None)
            param = originals.get(name)
            if t is None:
                param = None
            elif param is None:
                param = nn.Parameter(t, requires_grad=trains)
            else:   # the caller's Parameter object, its own requires_grad, the current values
                param.data = t
            mha.register_parameter(name, param)
        mha.out_proj = self.out_proj
        mha.bias_k, mha.bias_v = self.bias_k, self.bias_v
        mha.train(self.training)
        return mha

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


def attend(attn: nn.Module, query, key, value, key_padding_mask=None, need_weights=True,
           attn_mask=None, average_attn_weights=True, is_causal=False, *, batch_first=False,
           bias_k=None, bias_v=None, add_zero_attn=False, dropout=0.0):
    """``F.multi_head_attention_forward`` (the same arguments, masks and outputs) computed with
    ``attn``'s ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` modules, so a fake-quant or
    INT4 layer in their place runs; ``attn`` also gives ``embed_dim``, ``num_heads`` and
    ``training`` (dropout applies in training only)."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError("LinearMultiheadAttention does not take NestedTensor inputs "
                         "(nn.MultiheadAttention reads them only on its fused fast path)")
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                 attn.num_heads)
    if not batched:   # [L, E] -> [1, L, E]
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:   # [L, B, E] -> [B, L, E]
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    bsz, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
    h, d = attn.num_heads, attn.embed_dim // attn.num_heads
    if query.shape[-1] != attn.embed_dim:
        raise ValueError(f"query has {query.shape[-1]} features; this attention was built "
                         f"for embed_dim={attn.embed_dim}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key's batch and sequence dims {tuple(key.shape[:2])} do not "
                         f"match value's {tuple(value.shape[:2])}")

    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                           "nn.MultiheadAttention: nn.Transformer."
                           "generate_square_subsequent_mask makes one)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None   # the hint stands for the mask
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask",
                                      other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None:   # -> [1 or B, 1 or H, tgt, src]
        if attn_mask.dim() == 2:
            _expect(attn_mask, (tgt_len, src_len), "2D attn_mask")
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            _expect(attn_mask, (bsz * h, tgt_len, src_len), "3D attn_mask")
            attn_mask = attn_mask.view(bsz, h, tgt_len, src_len)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    q, k, v = attn.q_proj(query), attn.k_proj(key), attn.v_proj(value)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.expand(bsz, 1, -1)], dim=1)
        v = torch.cat([v, bias_v.expand(bsz, 1, -1)], dim=1)
        attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
    q, k, v = (t.view(bsz, t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))
    if add_zero_attn:
        zeros = k.new_zeros(bsz, h, 1, d)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, k.shape[2]):
            raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}"
                               f", expected ({bsz}, {src_len})")
        kpm = key_padding_mask.view(bsz, 1, 1, k.shape[2])
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = dropout if attn.training else 0.0

    weights = None
    if need_weights:   # as torch computes it: baddbmm, softmax, dropout, bmm
        n, src = bsz * h, k.shape[2]
        qs = (q * math.sqrt(1.0 / d)).reshape(n, tgt_len, d)
        kt = k.reshape(n, src, d).transpose(1, 2)
        scores = (torch.bmm(qs, kt) if attn_mask is None else torch.baddbmm(
            attn_mask.expand(bsz, h, tgt_len, src).reshape(n, tgt_len, src), qs, kt))
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0:   # (the weights returned are the dropped ones, as in torch)
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v.reshape(n, src, d)).view(bsz, h, tgt_len, d)
        weights = weights.view(bsz, h, tgt_len, src)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = attn.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, attn.embed_dim))
    if not batched:
        out = out.squeeze(0)
        weights = None if weights is None else weights.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return lin


def _expect(mask: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(mask.shape) != shape:
        raise RuntimeError(f"The shape of the {what} is {tuple(mask.shape)}, but should be "
                           f"{shape}.")


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key position (a bias or zero key), unmasked."""
    return None if mask is None else F.pad(mask, (0, 1))


def _split_packed_keys(module, state_dict, prefix, *args) -> None:
    """Load hook: a packed ``nn.MultiheadAttention`` state (``in_proj_weight`` /
    ``in_proj_bias`` / ``{q,k,v}_proj_weight``) becomes the linears' keys."""
    w, b = state_dict.pop(prefix + "in_proj_weight", None), state_dict.pop(
        prefix + "in_proj_bias", None)
    e = module.embed_dim
    if w is not None:
        for i, p in enumerate(("q", "k", "v")):
            state_dict[f"{prefix}{p}_proj.weight"] = w[i * e:(i + 1) * e]
    for p in ("q", "k", "v"):
        sep = state_dict.pop(f"{prefix}{p}_proj_weight", None)
        if sep is not None:
            state_dict[f"{prefix}{p}_proj.weight"] = sep
    if b is not None:
        for i, p in enumerate(("q", "k", "v")):
            state_dict[f"{prefix}{p}_proj.bias"] = b[i * e:(i + 1) * e]


_PROJS = ("q_proj", "k_proj", "v_proj", "out_proj")


class _WavLMSelfAttention:
    """Stands in, on one ``WavLMAttention``, for transformers'
    ``torch_multi_head_self_attention``, which hands the projections' weights to
    ``F.multi_head_attention_forward`` (so the linears never run): the same computation, with
    the linears called. Transformers' signature and outputs (head-averaged weights broadcast
    over the heads)."""

    ARGS = ("hidden_states", "attention_mask", "gated_position_bias")

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, hidden_states, attention_mask, gated_position_bias):
        m = self.module
        x = hidden_states.transpose(0, 1)   # [L, B, E], as transformers hands it over
        pad = attention_mask.ne(1) if attention_mask is not None else None
        out, w = attend(m, x, x, x, pad, True, gated_position_bias, dropout=m.dropout)
        return out.transpose(0, 1), w[:, None].broadcast_to(
            w.shape[:1] + (m.num_heads,) + w.shape[1:])


# attention modules of other libraries whose forward reads their linears' weights directly:
# class name -> (the method doing so, its stand-in, called with the linears)
_REROUTED = {"WavLMAttention": ("torch_multi_head_self_attention", _WavLMSelfAttention)}


def _reroutable(module: nn.Module) -> bool:
    """A module of a :data:`_REROUTED` class, not rerouted yet, with linear projections and
    the method's signature the stand-in was written for."""
    spec = _REROUTED.get(type(module).__name__)
    if spec is None or spec[0] in module.__dict__:
        return False
    method = getattr(type(module), spec[0], None)
    args = tuple(inspect.signature(method).parameters)[1:] if callable(method) else ()
    return args == spec[1].ARGS and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in _PROJS)


def _rerouted(module: nn.Module) -> bool:
    spec = _REROUTED.get(type(module).__name__)
    return spec is not None and isinstance(module.__dict__.get(spec[0]), spec[1])


def _unpackable(name: str, module: nn.Module) -> bool:
    """An exact ``nn.MultiheadAttention`` (a subclass may compute something else) whose
    weights are at hand (not on ``meta``, no accelerate hooks that place them)."""
    if type(module) is not nn.MultiheadAttention:
        return False
    if any(p.is_meta for p in module.parameters()) or hasattr(module, "_hf_hook"):
        logger.warning("%s: nn.MultiheadAttention with offloaded (meta) weights or accelerate "
                       "hooks is not unpacked; its projections stay in float", name)
        return False
    if not name:
        logger.warning("the model itself is an nn.MultiheadAttention, which cannot be replaced "
                       "in place: its in-projection stays in float. Fix: wrap it, e.g. "
                       "nn.Sequential(attention)")
        return False
    return True


def unpack_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` with a
    :class:`LinearMultiheadAttention`, in place, and return their names. The float function is
    unchanged (to rounding: the same products, scaled-dot-product attention kernels instead of
    the fused one). Idempotent. Also turns off ``nn.TransformerEncoder``'s nested-tensor fast
    path, which would read the packed weights."""
    found = [(n, m) for n, m in model.named_modules() if _unpackable(n, m)]
    with torch.no_grad():
        replace_modules(model, {id(m): LinearMultiheadAttention(m) for _, m in found})
    for name, module in model.named_modules():
        if _reroutable(module):
            method, stand_in = _REROUTED[type(module).__name__]
            module.__dict__[method] = stand_in(module)
            found.append((name, module))
    if found:
        for enc in model.modules():
            if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", 0):
                enc.use_nested_tensor = False
                enc.__dict__["_modelopt_lite_nested"] = True
        logger.info("unpacked %d nn.MultiheadAttention module(s) into q/k/v/out nn.Linear "
                    "(first: %s)", len(found), found[0][0])
    return [n for n, _ in found]


def pack_attention(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Undo :func:`unpack_attention`: put the original ``nn.MultiheadAttention`` modules back
    (the same objects, their packed parameters refilled from the linears), in place; return
    their names. ``names`` limits it to those modules. The linears must be plain float
    ``nn.Linear`` layers (call :func:`modelopt_lite.unquantize` first). 2:4 zeros stay in the
    packed weights; the q/k/v sparsity masks and records go (``out_proj`` keeps its own)."""
    found = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, LinearMultiheadAttention) or _rerouted(m)) and n
             and (names is None or n in names)]
    for name, attn in found:
        for proj in _PROJS:
            lin = getattr(attn, proj)
            if not isinstance(lin, nn.Linear) or is_quantized(lin):
                raise ValueError(f"{name}.{proj} is a {type(lin).__name__}, not a float "
                                 "nn.Linear: unquantize the model (or reload it) before packing "
                                 "its attention")
    ids = {id(m) for _, m in found if isinstance(m, LinearMultiheadAttention)}
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if id(m) in ids]
    with torch.no_grad():
        replace_modules(model, {id(m): m.pack() for _, m in found if id(m) in ids})
    for _, m in found:
        if _rerouted(m):
            del m.__dict__[_REROUTED[type(m).__name__][0]]
    if found:
        _forget_records(model, aliases)
    return [n for n, _ in found]


def _forget_records(model: nn.Module, packed: list[str]) -> None:
    """After packing: the nested-tensor setting and the unpacked flag (when no unpacked
    attention remains), and the sparsity records of q/k/v linears that no longer exist."""
    none_left = not has_unpacked_attention(model)
    if none_left:
        for enc in model.modules():
            if enc.__dict__.pop("_modelopt_lite_nested", False):
                enc.use_nested_tensor = True
    state = getattr(model, "_modelopt_lite", None)
    if not state:
        return
    if none_left:
        state.pop("attention_unpacked", None)
    sparsity = state.get("sparsity")
    if sparsity:
        gone = {f"{n}.{p}" for n in packed for p in ("q_proj", "k_proj", "v_proj")}
        sparsity["layers"] = [r for r in sparsity["layers"] if r["name"] not in gone]


def has_unpacked_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an unpacked ``nn.MultiheadAttention`` or a rerouted module."""
    return any(isinstance(m, LinearMultiheadAttention) or _rerouted(m) for m in model.modules())
