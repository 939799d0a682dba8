"""Int4Linear: an INT4 weight-only linear layer backed by the Triton W4A16 kernels,
and deploy_int4(), which swaps fake-quant INT4 linears for it."""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch import nn

from modelopt_lite.kernels import PackedInt4, dequantize, pack_weight, w4a16_reference
from modelopt_lite.kernels.packing import (TILE_ROWS, check_group_size, check_tile_rows, padded_k,
                                           relayout_words, swap_pair_bytes)

log = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _matmul(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton kernel for CUDA inputs, the plain-torch reference elsewhere."""
    if x.is_cuda and _triton_available():
        from modelopt_lite.kernels import w4a16_matmul

        return w4a16_matmul(x, p, bias)
    return w4a16_reference(x, p, bias)


def _compiling() -> bool:
    """Under torch.compile, not torch.export (an exported graph keeps the reference's plain
    operators, which exporters such as ONNX can translate)."""
    # the flag torch.export sets, read directly: before PyTorch 2.12 Dynamo traced
    # torch.compiler.is_exporting() as True under torch.compile too (pytorch/pytorch#176347)
    exporting = getattr(torch.compiler, "_is_exporting_flag", None)
    if exporting is None:
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return torch.compiler.is_compiling() and not exporting


@torch.library.custom_op("modelopt_lite::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 zterm: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int,
                 in_features: int, tile_rows: int) -> torch.Tensor:
    """``Int4Linear``'s product as one opaque operator, so that ``torch.compile`` traces a
    model through it (no graph break; CUDA graphs with ``mode="reduce-overhead"``), with the
    gradients of :func:`_backward`. Eager calls that need no gradient skip the operator's
    dispatch and run the kernel directly."""
    return _matmul(x, PackedInt4(qweight, scale, zterm, group_size, in_features, tile_rows),
                   bias)


@w4a16_linear.register_fake
def _(x, qweight, scale, zterm, bias, group_size, in_features, tile_rows):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zterm, bias, group_size, in_features, tile_rows = inputs
    ctx.save_for_backward(qweight, scale, zterm)
    ctx.packing = (group_size, in_features, tile_rows)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradients of ``x @ W_hat^T + bias`` for the input (``grad @ W_hat``, the weight
    dequantized for the call) and the bias; the packed weight is frozen."""
    qweight, scale, zterm = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize(PackedInt4(qweight, scale, zterm, *ctx.packing), grad.dtype)
        gx = grad @ w
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, gb, None, None, None


w4a16_linear.register_autograd(_backward, setup_context=_setup_context)


LAYOUT_VERSION = 2   # tiled words' pairs byte-swapped (packing.swap_pair_bytes); 1: not


class Int4Linear(nn.Module):
    """y = (x * pre_scale) @ W_hat^T + bias with W_hat = u * scale + zterm held as packed INT4.

    Buffers follow :mod:`modelopt_lite.kernels.packing`: ``qweight`` int32 [N, Kp/8] (Kp = K
    rounded up to 128; laid out tile by tile in row blocks of ``tile_rows``, by default 256,
    :func:`~modelopt_lite.kernels.packing.tile_words`, which every kernel reads and the Hopper
    one reads fastest; 0: row by row), ``scale`` and ``zterm`` (= -zero * scale; absent when
    symmetric) [N, K/B] in ``dtype``, optional ``bias`` [N] and ``pre_scale`` [K]. CUDA inputs
    run the Triton kernel; CPU inputs run the plain-torch reference. Under ``torch.compile`` the
    product is the custom operator ``torch.ops.modelopt_lite.w4a16_linear``. The packed weight
    is frozen; an input (or bias) that requires grad gets its gradient (``grad @ W_hat``, the
    weight dequantized in the backward), so adapters trained before an INT4 layer learn.
    The state dict records the words' layout (``_extra_state``: tile rows, layout version); one
    without it (saved before the layout was recorded) holds them row by row, one with tile rows
    alone holds tiled words whose pairs are not byte-swapped yet (before version 2); both are
    converted on load.

    ``keep_float32`` is for a layer the model keeps in float32 while the rest runs in half
    precision (Hugging Face's ``_keep_in_fp32_modules``, such as T5's ``wo`` loaded in fp16,
    whose outputs can exceed fp16's range): its product runs in float32 on the weight
    dequantized for each call instead of on the half-precision kernel, so it keeps float32's
    range; the words stay packed. :func:`deploy_int4` sets it for such layers.

        >>> model = torch.compile(deploy_int4(model), mode="reduce-overhead")  # doctest: +SKIP
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 bias: bool = True, symmetric: bool = False, pre_scale: bool = False,
                 dtype: torch.dtype = torch.float16, device=None, tile_rows: int = TILE_ROWS,
                 keep_float32: bool = False):
        super().__init__()
        self.keep_float32 = bool(keep_float32)
        check_group_size(group_size)
        if tile_rows:
            check_tile_rows(tile_rows)
        self.tile_rows = int(tile_rows)
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} must be divisible by the block size "
                             f"{group_size}; pick another block size")
        if dtype not in _HALF:
            raise TypeError(f"Int4Linear dtype must be float16 or bfloat16, got {dtype}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, padded_k(in_features) // 8,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("zterm", None if symmetric else
                             torch.zeros(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.register_buffer("pre_scale", torch.ones(in_features, dtype=dtype, **kw)
                             if pre_scale else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group_size: int, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float16,
                   pre_scale: torch.Tensor | None = None,
                   tile_rows: int = TILE_ROWS, keep_float32: bool = False) -> "Int4Linear":
        """Build from quantizer output: codes uint8 [N, K] in 0..15, scale/zero [N, K/B]
        (zero=None: symmetric, z=8), W_hat = (codes - zero) * scale."""
        n, k = codes.shape
        p = pack_weight(codes, scale, zero, group_size, dtype)
        mod = cls(k, n, group_size, bias=bias is not None, symmetric=zero is None,
                  pre_scale=pre_scale is not None, dtype=dtype, device=codes.device,
                  tile_rows=tile_rows, keep_float32=keep_float32)
        mod.qweight.copy_(p.tiled(tile_rows).qweight)
        mod.scale.copy_(p.scale)
        if p.zterm is not None:
            mod.zterm.copy_(p.zterm)
        if bias is not None:
            mod.bias.copy_(bias.detach().to(dtype))
        if pre_scale is not None:
            if pre_scale.shape != (k,):
                raise ValueError(f"pre_scale must be [{k}], got {tuple(pre_scale.shape)}")
            mod.pre_scale.copy_(pre_scale.detach().to(dtype))
        return mod

    def spec(self) -> dict:
        """The constructor's arguments, as JSON (checkpoints record deployed layers by it)."""
        spec = dict(in_features=self.in_features, out_features=self.out_features,
                    group_size=self.group_size, bias=self.bias is not None,
                    symmetric=self.zterm is None, pre_scale=self.pre_scale is not None,
                    dtype=str(self.scale.dtype).removeprefix("torch."), tile_rows=self.tile_rows)
        if self.keep_float32:   # only when set: checkpoints saved before it load as they did
            spec["keep_float32"] = True
        return spec

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "Int4Linear":
        """An empty layer of :meth:`spec`'s shape, to load a state dict into (whatever the
        saved layout of its words: the load converts them)."""
        kw = {k: v for k, v in spec.items() if k != "dtype"}
        return cls(**kw, dtype=getattr(torch, spec.get("dtype", "float16")), device=device)

    @property
    def packed(self) -> PackedInt4:
        return PackedInt4(self.qweight, self.scale, self.zterm, self.group_size, self.in_features,
                          self.tile_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The layer's effective weight [out, in] in float32 (``pre_scale`` folded in),
        dequantized on each access: ``x @ m.weight.T + m.bias`` computes what the layer does.
        For model code that reads a linear's ``weight`` (T5 casts its feed-forward input to
        ``wo.weight.dtype``; float32 keeps that cast safe) and for inspection; the layer's own
        forward never uses it, and it is not in the state dict. It is a fresh inference tensor:
        an in-place edit (which could not reach the packed words) raises instead of doing
        nothing. Each access dequantizes the whole layer."""
        with torch.inference_mode():
            w = dequantize(self.packed, torch.float32)
            return w if self.pre_scale is None else w * self.pre_scale.to(torch.float32)

    def get_extra_state(self) -> torch.Tensor:
        """The words' layout, saved beside them: [tile_rows, LAYOUT_VERSION] (a tensor, for
        safetensors)."""
        return torch.tensor([self.tile_rows, LAYOUT_VERSION], dtype=torch.int32)

    def set_extra_state(self, state) -> None:
        pass   # the words were converted to this layer's layout before they were copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Words saved in another layout (another ``tile_rows``, or row by row: a state dict
        without ``_extra_state``) are converted to this layer's."""
        key, qkey = prefix + "_extra_state", prefix + "qweight"
        saved = state_dict.get(key)
        rows = int(saved.reshape(-1)[0]) if isinstance(saved, torch.Tensor) else 0
        version = (int(saved.reshape(-1)[1]) if isinstance(saved, torch.Tensor)
                   and saved.numel() > 1 else 1)
        q = state_dict.get(qkey)
        if rows and version < 2 and isinstance(q, torch.Tensor):
            q = state_dict[qkey] = swap_pair_bytes(q)   # tiled before the pairs were swapped
        if saved is None and isinstance(q, torch.Tensor) and self.tile_rows:
            log.warning("%s: the state dict does not record its INT4 words' layout "
                        "(%s_extra_state); they are taken as row by row, as saved before the "
                        "layout was recorded. Load the whole state dict of a deployed model, "
                        "with its _extra_state entries.", prefix.rstrip(".") or "Int4Linear",
                        prefix)
        if (isinstance(q, torch.Tensor) and rows != self.tile_rows
                and tuple(q.shape) == tuple(self.qweight.shape)):
            state_dict[qkey] = relayout_words(q, rows, self.tile_rows)   # checks `rows`
        state_dict[key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        """``model.float()`` / ``.double()`` leave the scales in half precision (the kernels
        read fp16 or bf16; the layer takes float32 inputs as they are); ``.to(torch.bfloat16)``
        and device moves apply."""
        dtype = self.scale.dtype
        out = super()._apply(fn, recurse)
        if self.scale.dtype not in _HALF:
            for name in ("scale", "zterm", "bias", "pre_scale"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.to(dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"Int4Linear takes floating-point activations, got {x.dtype}")
        in_dtype = x.dtype
        if self.keep_float32:
            return self._forward_float32(x).to(in_dtype)
        if x.is_cuda:   # the kernels take the scales' half precision; the CPU reference
            x = x.to(self.scale.dtype)   # computes in float32 and keeps the input's range
        if self.pre_scale is not None:
            x = x * self.pre_scale
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or getattr(self.bias, "requires_grad", False))
        # the operator: one opaque node for torch.compile, and the gradients (the kernels
        # compute none)
        if _compiling() or needs_grad:
            y = w4a16_linear(x, self.qweight, self.scale, self.zterm, self.bias, self.group_size,
                             self.in_features, self.tile_rows)
        else:
            y = _matmul(x, self.packed, self.bias)
        return y.to(in_dtype)

    def _forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """The product in float32, on the weight dequantized for this call (plain torch ops:
        autograd gives the input's gradient, torch.compile and torch.export trace them)."""
        with torch.no_grad():
            w = dequantize(self.packed, torch.float32)
        x = x.to(torch.float32)
        if self.pre_scale is not None:
            x = x * self.pre_scale.to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, symmetric={self.zterm is None}, "
                f"bias={self.bias is not None}, pre_scale={self.pre_scale is not None}"
                + (", keep_float32=True" if self.keep_float32 else ""))


def _is_int4_fake_quant(module: nn.Module) -> bool:
    wq = getattr(module, "weight_quantizer", None)
    weight = getattr(module, "weight", None)
    return (wq is not None and bool(getattr(wq, "is_int4_block", False))
            and hasattr(wq, "int4_codes") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def _sparse_codes(name: str, codes, scale, zero, block, mask):
    """The codes with every pruned weight (``mask`` False) on the level that is exactly 0, as
    the fake-quant layer's masked product has it; a clear error where a block has no such
    level (asymmetric INT4 with float zero points)."""
    z = torch.full_like(scale, 8.0) if zero is None else zero.to(scale.device)
    zq = z.repeat_interleave(block, 1)[:, :codes.shape[1]]
    pruned = ~mask.to(torch.bool)
    exact = (zq == zq.round()) & (zq >= 0) & (zq <= 15)
    if not bool(exact[pruned].all()):
        raise ValueError(
            f"{name}: a 2:4-sparse layer quantized to asymmetric INT4 cannot be deployed "
            "exactly: its blocks' zero points are fractional, so no INT4 level is 0 and the "
            "pruned weights would come back as nonzero values; quantize sparse layers with "
            "symmetric INT4 (the 'int4_weight_only_sym' preset, or QuantizerSpec(..., "
            "symmetric=True)) or integer zero points (QuantizerSpec(..., symmetric=False, "
            "integer_zero=True)) to deploy them")
    return torch.where(pruned, zq.round().to(codes.dtype), codes)


def _to_int4_linear(module: nn.Module, name: str = "", half_model: bool = False) -> Int4Linear:
    # [out, in] whatever the layer stores (Hugging Face Conv1D keeps [in, out])
    weight = (module.weight_2d() if hasattr(module, "weight_2d") else module.weight).detach()
    codes, scale, zero, block = module.weight_quantizer.int4_codes(weight)
    mask = module.mask_2d() if hasattr(module, "mask_2d") else None
    if mask is not None:   # 2:4 sparsity: the fake-quant product zeroes the pruned weights
        codes = _sparse_codes(name, codes, scale, zero, int(block), mask)
    iq = getattr(module, "input_quantizer", None)
    if getattr(iq, "rotation", None) is not None:
        raise ValueError(f"{getattr(iq, 'name', '')}: Int4Linear has no online input rotation; "
                         "call modelopt_lite.unquantize() to fold it, or quantize without "
                         "SmoothQuantConfig.rotate")
    pre_scale = getattr(iq, "pre_quant_scale", None) if iq is not None else None
    dtype = weight.dtype if weight.dtype in _HALF else torch.float16
    bias = getattr(module, "bias", None)
    # a float32 layer in a half-precision model was kept in float32 on purpose
    keep_float32 = half_model and weight.dtype == torch.float32
    if keep_float32:
        log.info("%s: float32 in a half-precision model; its INT4 product runs in float32",
                 name or type(module).__name__)
    return Int4Linear.from_codes(codes.to(weight.device), scale.to(weight.device),
                                 None if zero is None else zero.to(weight.device), int(block),
                                 bias=bias, dtype=dtype, pre_scale=pre_scale,
                                 keep_float32=keep_float32)


def int4_layers(model: nn.Module) -> dict[str, "Int4Linear"]:
    """The model's deployed layers (``Int4Linear``), by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (dotted) of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def deploy_int4(model: nn.Module) -> nn.Module:
    """Replace every INT4 block fake-quant linear in ``model`` (in place) by an Int4Linear.
    Every layer is converted before any is swapped: a layer that cannot be deployed leaves the
    model as it was. In a half-precision model, a layer whose weight is float32 (kept so by the
    model: Hugging Face's ``_keep_in_fp32_modules``, T5's ``wo`` in fp16) computes in float32
    (``Int4Linear.keep_float32``), as it did before."""
    targets = [(name, mod) for name, mod in model.named_modules() if _is_int4_fake_quant(mod)]
    half_model = any(p.dtype in _HALF for p in model.parameters())
    from ..calib.offload import at_hand, offloaded_weights

    offloaded = offloaded_weights(model)   # accelerate's CPU / disk offload, if any
    built = []
    for name, mod in targets:
        try:   # (an offloaded weight is read from the store onto its execution device)
            with at_hand(offloaded, name, mod):
                built.append((name, _to_int4_linear(mod, name, half_model)))
        except ValueError as err:
            if name and not str(err).startswith(name):
                raise ValueError(f"{name}: {err}") from err
            raise
    if not targets:
        log.warning("deploy_int4: no INT4 block fake-quant linear layers in the model (INT8, "
                    "per-channel INT4 and float layers stay as they are); nothing deployed")
    state = getattr(model, "_modelopt_lite", None)
    if built and built[0][0] and isinstance(state, dict):   # for modelopt_lite.save / load
        done = {r["name"]: r for r in state.get("deployed", [])}
        done.update({name: {"name": name, **new.spec()} for name, new in built})
        state["deployed"] = list(done.values())
    for name, new in built:
        if not name:
            return new
        swap_module(model, name, new)
        log.debug("deployed %s as %r", name, new)
    if offloaded is not None:   # a parent hook that offloads buffers looks the new ones up
        offloaded.complete(model)
    log.info("deploy_int4: %d linear layers now run on INT4 kernels", len(targets))
    return model
