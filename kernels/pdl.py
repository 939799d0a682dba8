"""Zeroed split-K outputs without a separate wait: programmatic dependent launch (PDL).

A split-K or stream-K launch adds its partial tiles with atomics into an output that must be
zero first. Zeroing it with ``torch.zeros`` puts a fill kernel before the GEMM in the stream,
and the GEMM cannot start until the fill has finished: on an H100 that costs 1.0-1.8 us a call
(``benchmarks/kernels/ab.py --zeros-arm``; NOTES.md, v36), 2-15 % of a small-batch layer;
PDL won 0.6-1.1 us of it back on the large Llama shapes.

With PDL (Hopper and later) :func:`zero_` launches a small zeroing kernel whose programs let
the next kernel start at once (``griddepcontrol.launch_dependents``); the GEMM, launched with
``launch_pdl=True``, streams its weights meanwhile and waits (``griddepcontrol.wait``) only
before its first write to the output. The
warp-specialized (``ws.py``) and small-M MMA (``mma.py``) kernels do this (their ``PDL``
option); the MMA kernel's ``XPERM`` configs with ``PREP`` (one kernel permutes the activations
and zeroes the output) and the GEMV and fused kernels' split outputs are zeroed as before.

The zeroing kernel is launched the ordinary way, after everything before it in the stream
(the output's memory may have been freed by a kernel that just ran); only the GEMM overlaps,
and only with the zeroing. ``MODELOPT_LITE_PDL=0`` turns it off (then ``Tensor.zero_``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENV_PDL = "MODELOPT_LITE_PDL"

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():   # what the kernels call under ``if PDL:``, never True without it
        pass


def pdl_ok(device: torch.device) -> bool:
    """Whether outputs on ``device`` are zeroed for a PDL launch: a CUDA GPU of compute
    capability 9.0 or later, a Triton with grid dependency control, not the interpreter, and
    not turned off by ``MODELOPT_LITE_PDL=0``."""
    if (not HAVE_GDC or device.type != "cuda" or os.environ.get(ENV_PDL, "1") == "0"
            or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


if HAVE_GDC:
    @triton.jit
    def _zero_kernel(out_ptr, numel, BLOCK: tl.constexpr):
        gdc_launch_dependents()   # the GEMM may start now; it waits before writing
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.zeros([BLOCK], out_ptr.dtype.element_ty), mask=offs < numel)


def launch_options(pdl: bool) -> dict:
    """The GEMM launch's options after :func:`zero_` returned ``pdl``: the kernel's ``PDL``
    option (wait before writing) and, with it, Triton's ``launch_pdl``."""
    return dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)


def zero_(out: torch.Tensor) -> bool:
    """Zero the contiguous tensor ``out`` for split-K atomics; True where the next kernel
    launch should be a PDL launch (``launch_pdl=True``) whose kernel waits for the zeroing
    (``griddepcontrol.wait``) before writing ``out``: launch it next, with nothing in between
    on the stream. False: zeroed the ordinary way (``Tensor.zero_``)."""
    if not (out.numel() and out.is_contiguous() and pdl_ok(out.device)):   # (no grid of 0)
        out.zero_()
        return False
    numel = out.numel()
    block = 2048
    _zero_kernel[(triton.cdiv(numel, block),)](out, numel, BLOCK=block, num_warps=4)
    return True
