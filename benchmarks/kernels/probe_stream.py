"""Where the small-M time goes on the large shapes: (1) read-only kernels over the packed words
with the MMA/GEMV kernels' access pattern ([BN, 16 CH] int32 tiles, CH chunks per load, grid
(split, row block)) and with a plain contiguous sweep, to find the read floor of the layout;
(2) the shipped op against the same graph without its zero-fill launch (output buffer made
once), to price the launches; (3) the shipped MMA tiles at split-K 32 / 64. One process, CUDA
graphs over rotating weight copies, median of 25 replays.

    python benchmarks/kernels/probe_stream.py --out probe_h100.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, parse_shapes, problems  # noqa: E402
from common import copy_bandwidth, graph_time_us, import_kernels  # noqa: E402
from sweep_v5 import best_of, shipped  # noqa: E402


@triton.jit
def read_tiles(q_ptr, out_ptr, N, KW, SPLIT_K, BN: tl.constexpr, CH: tl.constexpr):
    """XOR of every word in rows [BN pid_n, +BN), chunks of this program's K slice, CH chunks
    (16 CH words per row) per load."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    kt_total = KW // 16
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    ptrs = q_ptr + rows[:, None] * KW + tl.arange(0, 16 * CH)[None, :]
    acc = tl.zeros((BN, 16 * CH), tl.int32)
    for kt in range(kt0, kt1, CH):
        acc ^= tl.load(ptrs + kt * 16)
    tl.store(out_ptr + (pid_n * SPLIT_K + pid_k), tl.xor_sum(tl.xor_sum(acc, 1), 0))


@triton.jit
def _sz_x(srow, zrow, x_ptr, rj, kt, SZ: tl.constexpr, X: tl.constexpr):
    v = tl.zeros(srow.shape, tl.int32)
    if SZ:
        sv = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l",
                                       [(srow + kt).to(tl.int64)], dtype=tl.int16,
                                       is_pure=True, pack=1)
        zv = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l",
                                       [(zrow + kt).to(tl.int64)], dtype=tl.int16,
                                       is_pure=True, pack=1)
        v ^= sv.to(tl.int32) ^ zv.to(tl.int32)
    xs = tl.zeros(rj.shape, tl.int32)
    if X:
        for i in tl.static_range(8):
            xs ^= tl.load(x_ptr + kt * 128 + 16 * i + rj).to(tl.int16, bitcast=True).to(tl.int32)
    return v, xs


@triton.jit
def read_tiles_sz(q_ptr, s_ptr, z_ptr, x_ptr, out_ptr, N, KW, SPLIT_K, BN: tl.constexpr,
                  SZ: tl.constexpr, X: tl.constexpr, QC: tl.constexpr = "",
                  QE: tl.constexpr = "", PF: tl.constexpr = False):
    """read_tiles (CH 1) plus, per chunk, each row's scale and zterm (SZ: 2-byte loads as the
    kernels issue them) and the chunk's 128 activations of token 0 (X: eight [1, 16] loads);
    PF: words, scales and activations of the next chunk loaded during this one."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    kt_total = KW // 16
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    rj = tl.arange(0, 16)[None, :]
    ptrs = q_ptr + rows[:, None] * KW + rj
    srow = s_ptr + rows[:, None] * kt_total
    zrow = z_ptr + rows[:, None] * kt_total
    acc = tl.zeros((BN, 16), tl.int32)
    if PF:
        w_n = tl.load(ptrs + kt0 * 16, cache_modifier=QC, eviction_policy=QE)
        v_n, x_n = _sz_x(srow, zrow, x_ptr, rj, kt0, SZ, X)
    for kt in range(kt0, kt1):
        if PF:
            w, v, xs = w_n, v_n, x_n
            ktn = tl.minimum(kt + 1, kt1 - 1)
            w_n = tl.load(ptrs + ktn * 16, cache_modifier=QC, eviction_policy=QE)
            v_n, x_n = _sz_x(srow, zrow, x_ptr, rj, ktn, SZ, X)
        else:
            w = tl.load(ptrs + kt * 16, cache_modifier=QC, eviction_policy=QE)
            v, xs = _sz_x(srow, zrow, x_ptr, rj, kt, SZ, X)
        acc ^= w ^ v ^ xs
    tl.store(out_ptr + (pid_n * SPLIT_K + pid_k), tl.xor_sum(tl.xor_sum(acc, 1), 0))


@triton.jit
def read_flat(q_ptr, out_ptr, PER, BLOCK: tl.constexpr):
    """XOR of PER contiguous words from PER * program id, BLOCK words per load."""
    pid = tl.program_id(0)
    base = q_ptr + pid.to(tl.int64) * PER + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(0, PER, BLOCK):
        acc ^= tl.load(base + i)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x28672,28672x8192")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--out", default="probe.json")
    a = ap.parse_args()
    mk = import_kernels()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    res = {"copy_bw_TBps": bw / 1e12, "gpu": gpu, "read": [], "ops": []}
    shapes = parse_shapes(a.shapes)
    for k, n, m, w16, packed, nc, n16, x, ref in problems(mk, shapes, [int(v) for v in
                                                                       a.ms.split(",")]):
        qs = [packed.qweight.clone() for _ in range(nc)]
        kw = qs[0].shape[1]
        if m == int(a.ms.split(",")[0]):
            nbytes = qs[0].numel() * 4
            out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
            for bn, nw, sk, ch in ((32, 2, 16, 1),):
                if sk * ch > kw // 16:
                    continue
                grid = (sk, triton.cdiv(n, bn))
                fns = [lambda q=q: read_tiles[grid](q, out, n, kw, sk, BN=bn, CH=ch,
                                                    num_warps=nw) for q in qs]
                t = graph_time_us(fns)
                r = dict(K=k, N=n, kind="tiles", BN=bn, warps=nw, split=sk, CH=ch,
                         us=round(t, 2), TBps=round(nbytes / t / 1e6, 3))
                res["read"].append(r)
                print(json.dumps(r), flush=True)
            sz = [(packed.scale.clone(), packed.zterm.clone()) for _ in range(nc)]
            for bn, nw, sk in ((32, 2, 16),):
                for szf, xf, qc, qe, pf in ((False, False, "", "", False),
                                            (True, True, "", "", False),
                                            (False, False, "", "", True),
                                            (True, False, "", "", True),
                                            (False, True, "", "", True),
                                            (True, True, "", "", True),
                                            (True, True, "", "evict_first", True)):
                    grid = (sk, triton.cdiv(n, bn))
                    fns = [lambda q=q, sz_=sz_: read_tiles_sz[grid](
                        q, sz_[0], sz_[1], x, out, n, kw, sk, BN=bn, SZ=szf, X=xf, QC=qc, QE=qe,
                        PF=pf, num_warps=nw) for q, sz_ in zip(qs, sz)]
                    t = graph_time_us(fns)
                    r = dict(K=k, N=n, kind="tiles+" + ("s" if szf else "") + ("x" if xf else "")
                             + qc + ("/" + qe if qe else "") + (" pf" if pf else ""),
                             BN=bn, warps=nw, split=sk, CH=1, us=round(t, 2),
                             TBps=round(nbytes / t / 1e6, 3))
                    res["read"].append(r)
                    print(json.dumps(r), flush=True)
            total = qs[0].numel()
            for block, nw, per in ():
                if total % per:
                    continue
                grid = (total // per,)
                fns = [lambda q=q: read_flat[grid](q, out, per, BLOCK=block, num_warps=nw)
                       for q in qs]
                t = graph_time_us(fns)
                r = dict(K=k, N=n, kind="flat", BLOCK=block, warps=nw, per=per,
                         us=round(t, 2), TBps=round(nbytes / t / 1e6, 3))
                res["read"].append(r)
                print(json.dumps(r), flush=True)
        # the shipped op, and the same graph with the zero-fill made once outside it
        cfg = shipped(mk, m, n, k)
        fns = ours_fns(mk, packed, x, nc, cfg)
        row = dict(K=k, N=n, M=m, cfg=cfg, op_us=round(graph_time_us(fns), 2))
        real_zeros = torch.zeros
        static = {}

        def fake_zeros(*shape, **kw):
            key = (tuple(shape[0]) if len(shape) == 1 else tuple(shape), kw.get("dtype"))
            if key not in static:
                static[key] = real_zeros(*shape, **kw)
            return static[key]
        torch.zeros = fake_zeros
        try:
            row["no_zero_fill_us"] = round(graph_time_us(fns), 2)
        finally:
            torch.zeros = real_zeros
        row["op_again_us"] = round(graph_time_us(fns), 2)
        if cfg.get("MMA") or cfg.get("GEMV"):
            cands = [dict(cfg, SPLIT_K=s) for s in (32, 64) if s <= kw // 16]
            t, err, c = best_of(mk, packed, x, nc, ref, cands)
            row.update(split_best_us=round(t, 2), split_best_cfg=c)
            if cfg.get("GEMV"):
                cands = [dict(MMA=True, BN=bn, num_warps=nw, SPLIT_K=s, OUT16=True)
                         for (bn, nw) in ((64, 2), (64, 4), (128, 8)) for s in (16, 32)]
                t, err, c = best_of(mk, packed, x, nc, ref, cands)
                row.update(mma_best_us=round(t, 2), mma_best_cfg=c)
        del fns
        res["ops"].append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()
    print("read floor (us, TB/s):")
    for r in res["read"]:
        print(f"  {r['K']}x{r['N']} {r['kind']:5s} " + " ".join(
            f"{kk}={r[kk]}" for kk in ("BN", "warps", "split", "CH", "BLOCK", "per") if kk in r)
            + f"  {r['us']:.1f} us {r['TBps']:.2f} TB/s")
    for r in res["ops"]:
        print(f"  {r['K']}x{r['N']} M={r['M']}: op {r['op_us']} / {r['op_again_us']}, "
              f"no zero-fill {r['no_zero_fill_us']}, split32/64 {r.get('split_best_us')}"
              f" {(r.get('split_best_cfg') or {}).get('SPLIT_K')}, mma {r.get('mma_best_us')}")


if __name__ == "__main__":
    main()
