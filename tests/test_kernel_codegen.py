"""What the fused large-M kernel compiles to for Hopper (sm_90a), checked off the GPU.

Triton compiles for a named GPU target without one, and its NVIDIA backend ships ``ptxas``;
``ptxas -v`` reports (C7515) when it serializes the ``wgmma`` pipeline, which turns every
asynchronous tensor-core product into a synchronous one. The zero-trip path of the K loop
(a zeroed accumulator merging with the loop's) triggered it before the kernel returned early
for empty K slices: 892 -> 812 us at M = 1024 on 8192x28672 (benchmarks/kernels/NOTES.md, v13).
"""
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def _ptxas():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        pytest.skip("triton's NVIDIA backend has no ptxas here")
    return path


_SCRIPT = r"""
import inspect, json, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from modelopt_lite.kernels.w4a16 import w4a16_kernel

ptxas, work, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reports = []
for i, (bm, bn, warps, stages, pairs, bf16) in enumerate(cases):
    act = "*bf16" if bf16 else "*fp16"
    sig = {"x_ptr": act, "q_ptr": "*i32", "s_ptr": "*i32" if pairs else act, "z_ptr": act,
           "bias_ptr": act, "out_ptr": act, "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_om": "i32", "n_groups": "i32", "SPLIT_K": "i32"}
    const = dict(GROUP=128, BN=bn, BM=bm, GROUP_N=8, HAS_ZERO=True, HAS_BIAS=False,
                 IS_BF16=bf16, USE_ASM=True, EVEN_K=True, ATOMIC=False, DOT_F32=False,
                 FUSE_K=True, PAIRS=pairs, TR=0)
    params = list(inspect.signature(w4a16_kernel.fn).parameters)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(w4a16_kernel, sig,
                    constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(j,): [["tt.divisibility", 16]] for j in (0, 1, 2, 3, 4, 5, 8, 9, 10)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    ptx = f"{work}/k{i}.ptx"
    open(ptx, "w").write(k.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", f"{work}/k{i}.cubin"],
                         capture_output=True, text=True)
    reports.append(dict(rc=out.returncode, report=out.stdout + out.stderr,
                        wgmma="wgmma.mma_async" in k.asm["ptx"]))
print(json.dumps(reports))
"""

CASES = [
    (256, 128, 8, 3, True, False),    # the H100 table's M = 256 / 1024 tile
    (256, 128, 8, 3, False, True),
    (64, 128, 8, 4, True, False),     # M = 64
    (64, 256, 8, 4, True, False),
    (64, 128, 8, 4, 2, False),        # pairs transposed
    (256, 128, 8, 3, 2, False),
    (128, 256, 16, 3, 2, False),      # 4 warpgroups of 64 rows: 128 registers, 1 CTA per SM
    (64, 256, 16, 4, 2, False),
]


def _compile_reports(script: str, cases: list, tmp_path) -> list:
    """Run a compile script (argv: ptxas, work dir, JSON cases) in a fresh process with the
    real JIT (no interpreter) and a private cache; its last stdout line, parsed."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", script, str(_ptxas()), str(tmp_path),
                          json.dumps(cases)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_kernel_wgmma_pipeline_not_serialized(tmp_path):
    for case, rep in zip(CASES, _compile_reports(_SCRIPT, CASES, tmp_path)):
        assert rep["wgmma"], case                   # the Hopper tensor-core path was taken
        assert rep["rc"] == 0, (case, rep["report"])
        assert "C7515" not in rep["report"], (case, rep["report"])   # wgmma serialized
        assert "C7513" not in rep["report"], (case, rep["report"])   # (operand registers)
        assert "0 bytes spill stores" in rep["report"], (case, rep["report"])


_WS_SCRIPT = r"""
import inspect, json, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from modelopt_lite.kernels import ws

ptxas, work, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reports = []
for i, case in enumerate(cases):
    bm, stages, bf16, zero, bias, atomic, persist, rows, coal, regs = case[:10]
    stream = len(case) > 10 and case[10]
    tiled = len(case) > 11 and case[11]
    pdl = len(case) > 12 and case[12]
    sz = case[13] if len(case) > 13 else 0
    nc = case[14] if len(case) > 14 else 2
    tr = case[15] if len(case) > 15 else (rows if tiled else 0)   # the words' row blocks
    wperm = len(case) > 16 and case[16]
    dt, ds = (gl.bfloat16, "bf16") if bf16 else (gl.float16, "fp16")
    od = "fp32" if atomic and bf16 else ds   # bf16 splits add into a float32 buffer
    x_l = gl.NVMMASharedLayout.get_default_for([bm, 64], dt)
    q_l = gl.NVMMASharedLayout.get_default_for([rows, 16], gl.int32)
    s_l = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    h_l = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    w_desc = f"tensordesc<i32[1, {rows}],{s_l!r}>"
    sig = {"x_desc": f"tensordesc<{ds}[{bm}, 64],{x_l!r}>",
           "q_desc": f"tensordesc<i32[{rows}, 16],{q_l!r}>",
           "sz_desc": w_desc if sz == 0 else f"tensordesc<{ds}[1, {rows}],{h_l!r}>",
           "z_desc": w_desc, "out_ptr": "*" + od,
           "bias_ptr": "*" + ds, "M": "i32", "N": "i32", "K": "i32", "stride_om": "i32",
           "SPLIT_K": "i32"}
    a = ws._dequant_asm(bf16, zero, sz == 2, False, bool(tiled or tr))   # tiled: swapped pairs
    const = dict(BM=bm, STAGES=stages, GROUP_N=8, HAS_BIAS=bias, ATOMIC=atomic,
                 PERSIST=persist, A0=a[0], A1=a[1], A2=a[2], A3=a[3], COAL=coal,
                 REGS=120 if nc == 4 else regs or 232, STREAM=stream, TILED=tiled, PDL=pdl,
                 SZ=sz, NC=nc, TR=tr, WPERM=wperm)
    params = list(inspect.signature(ws.w4a16_ws_kernel.fn).parameters)
    sig.update({k: "constexpr" for k in const})
    sig["NR"] = "i32"
    # the launch's specialization of 16-divisible pointers and sizes, as on a GPU
    src = GluonASTSource(ws.w4a16_ws_kernel, sig,
                         constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(j),): [["tt.divisibility", 16]]
                                for j in ("out_ptr", "bias_ptr", "N", "K", "stride_om")})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, **(dict(maxnreg=regs) if regs else {})))
    ptx = f"{work}/ws{i}.ptx"
    open(ptx, "w").write(k.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", f"{work}/ws{i}.cubin"],
                         capture_output=True, text=True)
    ptx_text = k.asm["ptx"]
    reports.append(dict(rc=out.returncode, report=out.stdout + out.stderr,
                        shared=k.metadata.shared, wgmma=ptx_text.count("wgmma.mma_async"),
                        tma=ptx_text.count("cp.async.bulk.tensor"),
                        lds_v4=ptx_text.count("ld.shared.v4"),
                        gdc=ptx_text.count("griddepcontrol.wait"),
                        stores=sorted(set(re.findall(r"st\.global[.a-z0-9]*", ptx_text))),
                        atomics=sorted(set(re.findall(r"atom\.global[.a-z0-9]*", ptx_text))),
                        threads=int(re.search(r"\.reqntid (\d+)", ptx_text).group(1)),
                        regs=int(re.search(r"Used (\d+) registers", out.stdout + out.stderr)
                                 .group(1))))
print(json.dumps(reports))
"""

WS_CASES = [   # BM, stages, bf16, zero points, bias, split-K, persistent, rows per program,
               # coalesced epilogue, registers per thread (0: the default)
    (256, 3, False, True, False, False, False, 128, False, 0),   # M >= 256: 3 stages of 72 KB
    (128, 4, True, False, True, False, False, 128, False, 0),    # bf16, no zero points, bias
    (16, 4, False, True, True, False, False, 128, False, 0),     # the smallest token tile
    (128, 4, False, True, True, True, False, 128, True, 0),      # split-K into the fp16 output
    (128, 4, True, True, False, True, False, 128, True, 0),      # bf16: into a float32 buffer
    (256, 3, False, True, True, False, True, 128, False, 0),     # persistent: one ring
    (128, 3, False, True, True, False, True, 256, True, 0),      # 256 rows, 128 per warpgroup
    (64, 6, False, True, False, False, False, 128, True, 0),     # coalesced stores
    (64, 4, False, True, True, True, False, 128, True, 80),      # two programs per SM
    (16, 4, True, False, False, False, False, 128, True, 80),
    # rings at the limit the coalesced epilogue is allowed beside (ws._coal_fits)
    (256, 3, False, True, True, False, False, 128, True, 0),     # M >= 256 tiles
    (256, 3, False, True, False, True, False, 128, True, 0),     # split into the fp16 output
    (64, 6, False, True, False, False, False, 256, True, 0),     # 256 rows, 6 stages
    # stream-K (the 11th field): runs of chunks, partial tiles added with atomics
    (256, 3, False, True, True, True, False, 128, True, 0, True),
    (64, 3, True, True, False, True, False, 128, True, 0, True),    # bf16: a float32 buffer
    (16, 4, False, True, False, True, False, 128, True, 80, True),
    # the words tile by tile (the 12th field; ws.tiled_words)
    (16, 4, False, True, False, False, False, 128, True, 80, False, True),
    (256, 3, False, True, False, False, True, 128, True, 0, False, True),
    # launched right after the output's zeroing kernel (the 13th field; kernels.pdl)
    (16, 4, False, True, False, True, False, 128, True, 80, False, True, True),
    (16, 4, False, True, True, True, False, 128, True, 80, True, True, True),   # stream-K
    (128, 4, True, True, False, True, False, 128, True, 0, False, False, True),   # bf16
    # the scales alone (1, symmetric) or with 4-bit integer zero points (2): the 14th field
    (16, 4, False, False, False, True, False, 128, True, 80, True, True, True, 1),
    (16, 4, False, True, False, True, False, 128, True, 80, True, True, True, 2),
    (16, 4, True, True, True, True, False, 128, True, 80, False, True, True, 2),
    (64, 4, False, True, True, True, False, 128, True, 80, False, False, False, 2),
    (256, 3, False, True, True, False, False, 128, True, 0, False, False, False, 2),
    (64, 6, True, True, False, False, True, 256, True, 0, False, True, False, 2),
    # four consumer warpgroups of 64 rows over a 256-row tile (the 15th field; ws._consumers)
    (64, 5, False, True, False, True, False, 256, True, 0, False, False, False, 0, 4),
    (64, 6, False, True, True, False, False, 256, True, 0, False, True, False, 0, 4),
    (64, 4, True, True, False, True, False, 256, True, 0, True, False, True, 2, 4),
    (16, 4, False, False, False, True, False, 256, True, 0, False, True, True, 1, 4),
    # deploy's tiled words read in place, row blocks of 256 (the 16th field): 128-row tiles
    # inside them, and 256-row ones
    (16, 4, False, True, False, True, False, 128, True, 80, True, True, True, 0, 2, 256),
    (64, 5, False, True, False, True, False, 256, True, 0, True, True, True, 0, 4, 256),
    (256, 3, False, True, True, True, False, 128, True, 0, True, True, False, 2, 2, 256),
    # WPERM (the 17th field): each thread's words of a row as one 16-byte shared load; no
    # coalesced epilogue, whose conversion reads 16 bytes too, so that only the words do
    (64, 6, False, True, False, False, False, 256, False, 0, False, True, False, 0, 4, 256, True),
    (256, 3, False, True, True, False, False, 128, False, 0, False, True, False, 0, 2, 256, True),
    (64, 6, False, True, False, False, False, 256, False, 0, False, True, False, 0, 4, 256),
]


def test_ws_kernel_compiles_for_hopper(tmp_path):
    """The warp-specialized Gluon kernel (kernels/ws.py) for sm_90a: two (or four) consumer
    partitions issuing eight register-operand wgmma per chunk and 64 rows, four bulk tensor
    copies in the
    producer, no spills, no serialized wgmma, its ring within the 227 KB of shared memory; the
    coalesced epilogue's 128-bit stores and vector atomics, and at 80 registers per thread at
    most half the register file (two programs per SM)."""
    pytest.importorskip("triton.experimental.gluon")
    for case, rep in zip(WS_CASES, _compile_reports(_WS_SCRIPT, WS_CASES, tmp_path)):
        bm, stages, bf16, zero, bias, atomic, persist, rows, coal, regs = case[:10]
        assert rep["rc"] == 0, (case, rep["report"])
        sz = case[13] if len(case) > 13 else 0
        assert rep["wgmma"] == 16 * rows // 128 and rep["tma"] == 4 + (sz == 2), (case, rep)
        # wgmma serialized: C7515 (a non-wgmma definition of the accumulator), C7513 (of an
        # operand register while a wgmma that reads it is in flight), C7511 (too few registers
        # for the pipeline: four consumer warpgroups with a 128-token accumulator)
        assert not any(c in rep["report"] for c in ("C7515", "C7513", "C7511")), (
            case, rep["report"])
        assert "0 bytes spill stores" in rep["report"], (case, rep["report"])
        assert rep["shared"] <= 232448, case
        # PDL: griddepcontrol.wait before the epilogue's atomics, once per consumer warpgroup
        assert (rep["gdc"] > 0) == (len(case) > 12 and case[12]), (case, rep["gdc"])
        if coal:   # whole lines: 128-bit stores, 8 fp16 (4 float32) per atomic
            assert rep["stores"] in ([], ["st.global.v4.b32"]), (case, rep["stores"])
            vec = ".v4.f32" if atomic and bf16 else ".v8.f16"
            assert all(vec in a for a in rep["atomics"]), (case, rep["atomics"])
            assert bool(rep["atomics"]) == atomic, (case, rep["atomics"])
        else:      # the accumulator's layout: one 16-bit element per store
            assert rep["stores"] == ["st.global.b16"], (case, rep["stores"])
        # two programs per SM need at most half the register file
        assert rep["threads"] * rep["regs"] <= (32768 if regs else 65536), (case, rep)
        if regs:
            assert rep["regs"] <= regs, (case, rep)
        if not coal:   # 16-byte shared loads: the words with WPERM, nothing without
            assert (rep["lds_v4"] > 0) == (len(case) > 16 and case[16]), (case, rep["lds_v4"])


_MMA_SCRIPT = r"""
import json, sys
from modelopt_lite.kernels.codegen import mma_report

ptxas, work, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reports = []
for i, case in enumerate(cases):
    tr, rows, fs, bf16 = case[:4]
    sv, partner = (case[4], case[5]) if len(case) > 4 else (1, False)
    reports.append(mma_report(work, f"m{i}", tr=tr, rows=rows, warps=2, sv=sv, partner=partner,
                              fs=fs, bf16=bf16))
print(json.dumps(reports))
"""


def test_mma_kernel_reads_tiled_words_with_as_many_byte_permutes(tmp_path):
    """The small-M MMA kernel (kernels/mma.py) for sm_90a on the tiled layout's byte-swapped
    word pairs: its inline PTX compiles, with no spills, and gathers each fragment byte with
    one PRMT of one word, as many as the row-by-row words' PRMT of two (v47's instruction
    count); fp16 / bf16, 2 / 4 rows per thread, scales applied after the products (FS)."""
    cases = [(tr, rows, fs, bf16) for rows, fs, bf16 in ((2, 0, False), (4, 0, False),
                                                        (2, 1, False), (2, 2, True))
             for tr in (0, 256)]
    reps = _compile_reports(_MMA_SCRIPT, cases, tmp_path)
    for case, rep in zip(cases, reps):
        assert rep["rc"] == 0, (case, rep["report"])
        assert "0 bytes spill stores" in rep["report"], (case, rep["report"])
    for i in range(0, len(cases), 2):   # (row by row, tiled) pairs
        assert reps[i]["prmt"] == reps[i + 1]["prmt"] > 0, (cases[i], reps[i], reps[i + 1])


def test_mma_partner_gather_keeps_row_words_registers(tmp_path):
    """``PARTNER`` (the pair's other word as each PRMT's unread second operand) on the tiled
    words: the 2-warp, 4-rows-a-thread, SV 4 kernel compiles to the row-by-row words' register
    count (128 with this ptxas), where the one-word gather takes more (132: 7 programs per SM
    instead of 8), with as many PRMT."""
    cases = [(0, 4, 0, False, 4, False), (256, 4, 0, False, 4, False),
             (256, 4, 0, False, 4, True), (256, 4, 0, True, 4, True)]
    reps = _compile_reports(_MMA_SCRIPT, cases, tmp_path)
    for case, rep in zip(cases, reps):
        assert rep["rc"] == 0 and "0 bytes spill stores" in rep["report"], (case, rep["report"])
        assert rep["prmt"] == reps[0]["prmt"], (case, rep["prmt"])
    assert reps[2]["regs"] <= reps[0]["regs"] < reps[1]["regs"], [r["regs"] for r in reps]
