"""What the small-M MMA kernel (:mod:`.mma`) compiles to for Hopper (sm_90a), without a GPU.

Triton compiles for a named GPU target on any machine, and its NVIDIA backend ships ``ptxas``
and ``cuobjdump``; registers per thread, spills and the instruction mix can so be read off the
GPU. Used by ``tests/test_kernel_codegen.py`` and ``benchmarks/kernels/mma_regs.py``::

    from modelopt_lite.kernels.codegen import mma_report
    rep = mma_report("/tmp/work", "a", tr=256, rows=4, warps=2, sv=4, partner=True)
    rep["regs"], rep["programs_per_sm"]

Run it with the real JIT (``TRITON_INTERPRET`` unset when the kernels are imported).
"""
from __future__ import annotations

import inspect
import re
import subprocess
from collections import Counter
from pathlib import Path

SASS_OPS = ("LDG", "PRMT", "HMMA", "LOP3", "HFMA2", "SHF", "IMAD")


def nvidia_tool(name: str) -> Path | None:
    """``ptxas`` / ``cuobjdump`` of Triton's NVIDIA backend, or None where it ships none."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def programs_per_sm(regs: int, warps: int) -> int:
    """Programs of ``warps`` warps that fit on one SM by registers alone (65,536 per SM,
    allocated per warp in steps of 256; at most 32 programs)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(32, 65536 // per_warp // warps)


def mma_report(work: str | Path, tag: str, *, tr: int, rows: int, warps: int = 2, sv: int = 1,
               swapped: bool | None = None, xperm: bool = False, n_tiles: int = 1,
               partner: bool = False, fs: int = 0, bf16: bool = False,
               sass: bool = False) -> dict:
    """Compile :func:`.mma.w4a16_mma_kernel` for sm_90a (block 128, zero points, split-K
    atomics) and assemble it with ``ptxas -v``.

    ``tr``: the words' tile rows (0: row by row); ``swapped``: byte-swapped word pairs
    (default: ``tr > 0``, as ``PackedInt4.tiled`` stores them); ``rows`` rows per thread over
    ``warps`` warps (BN = 8 * rows * warps); ``sv``, ``xperm``, ``partner``, ``fs`` as the
    config keys ``SV``, ``XPERM``, ``PARTNER``, ``FS``; ``n_tiles`` 16-token tiles. Files go
    to ``work`` under ``tag``. Returns ``rc``, the ptxas ``report``, ``regs``,
    ``programs_per_sm``, the PTX's ``prmt`` count and, with ``sass``, the SASS instruction
    count and the :data:`SASS_OPS` counts (``cuobjdump``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .mma import w4a16_mma_kernel
    from .ops import _mma_asm, _mma_fs_asm
    from .ptx import mma_constraints, mma_fs_constraints

    ptxas = nvidia_tool("ptxas")
    if ptxas is None:
        raise RuntimeError("triton's NVIDIA backend ships no ptxas here: install the CUDA "
                           "build of triton to compile for sm_90a")
    swapped = tr > 0 if swapped is None else swapped
    if fs:
        asm = _mma_fs_asm(bf16, True, n_tiles, True, rows, xperm, fs == 2, swapped, partner)
        cons = mma_fs_constraints(rows)
    else:
        asm = _mma_asm(bf16, True, 128, n_tiles, True, rows, xperm, swapped, partner)
        cons = mma_constraints(rows)
    act = "*bf16" if bf16 else "*fp16"
    sig = {"x_ptr": act, "q_ptr": "*i32", "s_ptr": act, "z_ptr": act, "bias_ptr": act,
           "out_ptr": act, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_om": "i32", "n_groups": "i32", "SPLIT_K": "i32"}
    const = dict(GROUP=128, BN=8 * rows * warps, HAS_ZERO=True, HAS_BIAS=False, EVEN_K=True,
                 ATOMIC=True, USE_ASM=True, IS_BF16=bf16, PREFETCH=False, ASM=asm,
                 CONSTRAINTS=cons, DOT_F32=False, ROWS=rows, XTB=8 * n_tiles if xperm else 0,
                 PIPE=None, FS=fs, QC="", QE="evict_first", SV=sv, PAIRS=False, PDL=False,
                 TR=tr)
    params = list(inspect.signature(w4a16_mma_kernel.fn).parameters)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(w4a16_mma_kernel, sig,
                    constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(j,): [["tt.divisibility", 16]] for j in (0, 1, 2, 3, 4, 5, 8, 9, 10)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    work = Path(work)
    ptx, cubin = work / f"{tag}.ptx", work / f"{tag}.cubin"
    ptx.write_text(k.asm["ptx"])
    out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True)
    report = out.stdout + out.stderr
    found = re.search(r"Used (\d+) registers", report)
    regs = int(found.group(1)) if found else None
    rep = dict(rc=out.returncode, report=report, regs=regs,
               programs_per_sm=programs_per_sm(regs, warps) if regs else None,
               prmt=len(re.findall(r"prmt\.b32", k.asm["ptx"])))
    if sass and out.returncode == 0:
        dump = subprocess.run([str(nvidia_tool("cuobjdump")), "-sass", str(cubin)],
                              capture_output=True, text=True).stdout
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", dump)
        count = Counter(o.split(".")[0] for o in ops)
        rep.update(sass=len(ops), ops={o: count[o] for o in SASS_OPS})
    return rep
