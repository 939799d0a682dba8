"""TensorQuantizer: fake-quantizes one tensor (a weight or an activation) by a QuantizerSpec.

Weights arrive as 2-D ``[out, in]`` views (the quant modules reshape Conv and Conv1D weights);
per-channel ranges are per output row, per-block ranges per (row, block of ``block_size``
along ``in``). Activations are quantized per tensor with a static calibrated range, or
dynamically per tensor / per token.

State (all buffers, saved in checkpoints): ``amax`` (and ``amin`` for asymmetric weights),
``pre_quant_scale``, a per-input-channel multiplier applied before quantization (an
unfolded SmoothQuant/AWQ smoothing scale), and, for activations, ``rotation``: an orthogonal
``[b, b]`` matrix applied to each run of ``b`` input channels before that multiplier (an online
block-Hadamard transform; the layer's weight holds the same rotation, so the product is
unchanged).

Example::

    q = TensorQuantizer(QuantizerSpec(num_bits=4, granularity="per_block", block_size=64),
                        name="layers.0.mlp.down_proj.weight", is_weight=True)
    q.init_from_weight(linear.weight)
    w_hat = q(linear.weight)
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantizerSpec
from . import functional as F
from .calibrators import make_calibrator


class CalibrationError(RuntimeError):
    """Calibration saw something it cannot use (NaN/Inf, no data, a missing range)."""


class TensorQuantizer(nn.Module):
    def __init__(self, spec: QuantizerSpec, name: str = "", is_weight: bool = False):
        super().__init__()
        self.spec = spec
        self.name = name
        self.is_weight = is_weight
        self.enabled = True
        self.clip_grad = False
        self._calibrator = None
        self.register_buffer("amax", None)
        self.register_buffer("amin", None)
        self.register_buffer("pre_quant_scale", None)
        self.register_buffer("rotation", None)

    # --- state ---
    @property
    def calibrating(self) -> bool:
        return self._calibrator is not None

    @property
    def is_int4_block(self) -> bool:
        return self.enabled and self.spec.num_bits == 4 and self.spec.granularity == "per_block"

    def set_range(self, amax: torch.Tensor, amin: torch.Tensor | None = None) -> None:
        self.amax = amax.detach().float().clone()
        self.amin = None if amin is None else amin.detach().float().clone()

    def set_pre_quant_scale(self, scale: torch.Tensor | None) -> None:
        self.pre_quant_scale = None if scale is None else scale.detach().clone()

    def set_rotation(self, r: torch.Tensor | None) -> None:
        """Rotate each run of ``r.shape[0]`` input channels by the orthogonal ``r`` before the
        pre-quant scale and quantization (activations only)."""
        if r is not None and (self.is_weight or r.dim() != 2 or r.shape[0] != r.shape[1]):
            raise ValueError(f"{self.name}: a rotation is a square matrix on an activation "
                             f"quantizer, got {tuple(r.shape)} on a "
                             f"{'weight' if self.is_weight else 'activation'} quantizer")
        self.rotation = None if r is None else r.detach().float().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("amax", "amin", "pre_quant_scale", "rotation"):
            if prefix + key in state_dict and getattr(self, key) is None:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- ranges ---
    def weight_range(self, w2d: torch.Tensor):
        """(amin or None, amax) of a 2-D weight at this spec's granularity."""
        s = self.spec
        w = w2d.detach().float()
        if s.granularity == "per_block":
            return F.block_range(w, s.block_size, s.symmetric, s.num_bits)
        dims = (1,) if s.granularity == "per_channel" else (0, 1)
        if s.symmetric:
            return None, F.symmetric_amax(w, dims, s.num_bits, s.granularity == "per_channel")
        keep = s.granularity == "per_channel"
        return w.amin(dim=dims, keepdim=keep), w.amax(dim=dims, keepdim=keep)

    def init_from_weight(self, w2d: torch.Tensor) -> None:
        amin, amax = self.weight_range(w2d)
        self.set_range(amax, amin)

    def _dynamic_range(self, x: torch.Tensor):
        if self.spec.granularity == "per_token":
            return None, x.detach().abs().amax(dim=-1, keepdim=True).float()
        return None, x.detach().abs().amax().float()

    # --- calibration ---
    def start_calibration(self) -> None:
        self._calibrator = make_calibrator(self.spec)

    def finish_calibration(self, required: bool = True) -> None:
        """Set the range from what the calibrator saw; with nothing seen, an error (or, with
        ``required=False``, no range)."""
        calib, self._calibrator = self._calibrator, None
        amax = calib.compute_amax() if calib is not None else None
        if amax is None and not required:
            return
        if amax is None:
            raise CalibrationError(
                f"{self.name}: no activations reached this quantizer during calibration; "
                "check that the forward loop runs the model on data that uses this layer, or "
                "exclude the layer")
        self.set_range(amax)

    def _check_finite(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise CalibrationError(
                f"{self.name}: {bad} NaN/Inf value(s) in the tensor reaching this quantizer; "
                "the model produces non-finite activations on the calibration data (try float32 "
                "or bfloat16 instead of float16, or check the inputs)")

    # --- forward ---
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its channels rotated by ``rotation`` (unchanged when there is none)."""
        return x if self.rotation is None else F.rotate_blocks(x, self.rotation)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rotate(x)
        if self.pre_quant_scale is None:
            return x
        return x * self.pre_quant_scale.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._scaled(x)
        if self._calibrator is not None:
            self._check_finite(x)
            self._calibrator.collect(x)
            return x
        if not self.enabled:
            return x
        return self.fake_quant(x)

    def _range_for(self, x: torch.Tensor):
        if self.spec.dynamic:
            return self._dynamic_range(x)
        if self.amax is None:
            if self.is_weight:
                return self.weight_range(x)
            raise CalibrationError(
                f"{self.name}: static activation quantizer has no range; calibrate the model "
                "(pass calib= or forward_loop= to quantize) or use a dynamic activation spec")
        return self.amin, self.amax

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        amin, amax = self._range_for(x)
        scale, zero = F.scale_zero(amin, amax, s.num_bits, s.symmetric, s.integer_zero)
        if s.granularity == "per_block" and self.is_weight:
            blocks = F.to_blocks(x, s.block_size)
            zb = zero.unsqueeze(-1) if zero is not None else None
            out = F.fake_quant(blocks, scale.unsqueeze(-1), zb, s.num_bits, s.symmetric,
                               self.clip_grad)
            return out.reshape(x.shape)
        return F.fake_quant(x, scale, zero, s.num_bits, s.symmetric, self.clip_grad)

    # --- export helpers ---
    def scale_zero(self, w2d: torch.Tensor | None = None):
        """(scale, zero or None) this quantizer uses; weights may pass the 2-D weight."""
        amin, amax = self._range_for(w2d) if w2d is not None else (self.amin, self.amax)
        return F.scale_zero(amin, amax, self.spec.num_bits, self.spec.symmetric,
                            self.spec.integer_zero)

    def int4_codes(self, w2d: torch.Tensor):
        """Unsigned 4-bit codes of a per-block INT4 weight: (codes u8 [N,K], scale, zero, block).

        ``W_hat = (codes - zero) * scale`` per block; ``zero`` is None when symmetric, meaning
        the codes carry an offset of 8 (``W_hat = (codes - 8) * scale``).
        """
        if not self.is_int4_block:
            raise ValueError(f"{self.name}: int4_codes needs an enabled per-block INT4 quantizer")
        s = self.spec
        scale, zero = self.scale_zero(w2d)
        zb = zero.unsqueeze(-1) if zero is not None else None
        q = F.quantize(F.to_blocks(w2d, s.block_size), scale.unsqueeze(-1), zb, 4, s.symmetric)
        codes = (q + 8 if s.symmetric else q).reshape(w2d.shape).to(torch.uint8)
        return codes, scale, zero, s.block_size

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else ("on" if self.enabled else "off")
        amax = "" if self.amax is None else f", amax{tuple(self.amax.shape)}"
        pqs = "" if self.pre_quant_scale is None else ", pre_quant_scale"
        rot = "" if self.rotation is None else f", rotation {self.rotation.shape[0]}"
        return f"{self.spec.describe()}, {state}{amax}{pqs}{rot}"
