"""W4A16 on Hopper, warp-specialized (``WS`` configs): ``w4a16_ws_kernel`` in Gluon.

One program per output tile of the transposed product, [128 rows, BM tokens] (or, with
``BN`` 256, [256 rows, BM <= 128 tokens]), in three partitions that meet only at shared-memory
barriers:

- a producer warp streams each 128-deep K chunk into a STAGES-deep ring with bulk tensor
  copies (TMA): the activations as two [BM, 64] boxes, the rows' [rows, 16] packed words and
  the chunk's scale / zero-term word per row (:func:`~.packing.pair_scales`, transposed; or
  the scales alone, symmetric, or the scales and 4-bit integer zero points:
  :func:`~.ops.ws_scales`), all counted on the stage's ``ready`` barrier;
- two consumer warpgroups (half the rows each, one partition each; or, ``WGS`` 4, four of 64
  rows over a 256-row tile) wait on ``ready``, load
  their words from shared memory straight into the wgmma A-operand layout (two adjacent words
  per thread, the pair the dequantization's PRMT joins), dequantize the eight nibble planes in
  registers (``dequant.py``'s asm: about two instructions per weight) and issue, per plane and
  64 rows, one m64nBMk16 wgmma from registers against the plane's [16, BM] slice of the
  activation tile; after the wgmma retire they release the stage on ``empty`` (two arrivals).

Against the single-partition fused kernel (``w4a16.py``), no warp waits at a CTA barrier
every chunk and no thread issues activation copies: while one warpgroup dequantizes, the
other's products run (``benchmarks/kernels/NOTES.md``, v18). Options, all compile-time:
SPLIT_K > 1 (K slices added with atomics), PERSIST (one ring walked through several tiles per
program), STREAM (stream-K: equal runs of the tiles' K chunks per program, partial tiles added
with atomics), BN 256, COAL (the epilogue through shared memory into whole-line stores and
``v8.f16`` atomics; on by default with a split or STREAM), MAXNREG (fewer registers per thread,
so that two programs share an SM at small M), WGS (4: a 256-row tile's rows over four consumer
warpgroups of 64 instead of two of 128) and TILED (the words read tile by tile from a copy,
:func:`tiled_words`, opt-in, see :func:`~.tuning.allow_tiled_copies`; a packed weight whose
words are tiled already, ``deploy``'s layout, :func:`~.packing.tile_words`, is read in place
whatever the config says, where its row blocks hold whole tiles: :func:`ws_supported`);
NOTES.md, v19-v38, has what each gained where. Needs
sm_90 (wgmma), block 128, K a multiple of 128, N a multiple of 4 and 16-byte aligned rows;
:func:`ws_supported` checks, and ``ops.w4a16_matmul`` runs the fused kernel with the same
config otherwise. Gluon kernels do not run in the interpreter.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.errors import OutOfResources
    HAVE_GLUON = True
except ImportError:  # an older Triton: the fused kernel serves WS configs
    HAVE_GLUON = False

from .dequant import _asm, _k_slice, _tile_of
from .packing import cached_layout, tile_words
from .pdl import launch_options, zero_
from .tuning import _num_sms, tiled_copies_allowed, ws_shape_ok

ROWS = 128   # rows per program by default: two consumer warpgroups of 64 (BN 256: of 128,
             # or WGS 4: four of 64)
SMEM = 232448 - 1024   # a block's 227 KB of shared memory, less room for the barriers


if HAVE_GLUON:
    @gluon.jit
    def _producer(x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb, ready, empty, off_n,
                  off_m, kt0, k_chunks, it0, STAGES: gl.constexpr, TILED: gl.constexpr = False,
                  kc_all=0, SZ: gl.constexpr = 0, TR: gl.constexpr = 0, NR=0):
        """Chunks kt0 .. kt0 + k_chunks - 1 of one tile into the ring, from ring position it0
        (the chunks the program filled before). TILED: the words are laid out tile by tile
        (row blocks of TR rows, NR rows in all, the last block holding what is left; in a
        block chunk after chunk; :func:`~.packing.tile_words`, or the padded copy
        :func:`tiled_words`), so that a chunk's box is one contiguous run of memory; kc_all is
        K / 128. SZ 2: each chunk's zero-point words too (the word of its 8-chunk run; the 7
        repeats come from L2)."""
        nbytes: gl.constexpr = (2 * x_desc.block_type.nbytes + q_desc.block_type.nbytes
                                + sz_desc.block_type.nbytes)
        zbytes: gl.constexpr = z_desc.block_type.nbytes if SZ == 2 else 0
        if TILED:   # the tile's row block: its first word row, its rows, the tile's offset in it
            first = (off_n // TR) * TR
            nb = gl.minimum(NR - first, TR)
            base = first * kc_all + off_n - first
        for kt in range(k_chunks):
            it = it0 + kt
            s = it % STAGES
            # a fresh barrier counts its phase before the first as complete: the first pass
            # through the ring does not wait
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes + zbytes)
            c = kt0 + kt   # the chunk along K
            tma.async_copy_global_to_shared(x_desc, [off_m, c * 128], bar, xlo.index(s))
            tma.async_copy_global_to_shared(x_desc, [off_m, c * 128 + 64], bar, xhi.index(s))
            if TILED:
                tma.async_copy_global_to_shared(q_desc, [base + c * nb, 0], bar, qb.index(s))
            else:
                tma.async_copy_global_to_shared(q_desc, [off_n, c * 16], bar, qb.index(s))
            tma.async_copy_global_to_shared(sz_desc, [c, off_n], bar, szb.index(s))
            if SZ == 2:
                tma.async_copy_global_to_shared(z_desc, [c // 8, off_n], bar, zb.index(s))

    @gluon.jit
    def _planes(q, s, z, asm: gl.constexpr):
        """Nibble planes 2b and 2b + 1 of the words q (the asm of byte b), dequantized into
        the dtype of the scales s."""
        return gl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r", [q, s, z],
                                         dtype=(s.dtype, s.dtype), is_pure=True, pack=2)

    @gluon.jit
    def _consumer(xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om, M, N,
                  off_n, off_m, pid_k, kt0, k_chunks, it0, WG: gl.constexpr, BM: gl.constexpr,
                  STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr,
                  A0: gl.constexpr, A1: gl.constexpr,
                  A2: gl.constexpr, A3: gl.constexpr, COAL: gl.constexpr = False,
                  PDL: gl.constexpr = False, SZ: gl.constexpr = 0, NC: gl.constexpr = 2,
                  WPERM: gl.constexpr = False):
        """Rows (ROWS / NC) WG .. (ROWS / NC) (WG + 1) - 1 of one tile (NC consumer
        warpgroups, 2 or 4) over k_chunks chunks from ring position it0,
        then its store (or, ATOMIC, its addition; PDL: after the zeroing kernel before this
        launch has finished, :mod:`~.pdl`). COAL: through shared memory into a layout
        in which each thread holds 8 adjacent rows and a warp 64 rows of 4 tokens, so that a
        warp's stores / atomics (16 bytes a thread; fp16 atomics as v8.f16) are whole 128-byte
        lines; in the accumulator's layout the 32 lanes of a warp touch 8 tokens' 16-byte
        pieces, and fp16 atomics go one element at a time. The chunks are kt0 .. kt0 +
        k_chunks - 1 along K; SZ is the scales' layout (:func:`w4a16_ws`): 0 one word of scale
        and zero term per row, 1 the scale alone (symmetric), 2 the scale and the 4-bit zero
        point of zero-point words, subtracted from the codes before the scale's multiply
        (integers: W_hat = (u - z) * s is rounded once, within an ulp of u * s + zterm).
        WPERM: the words through a permuted view of the tile, 16 contiguous bytes a thread
        (:func:`wperm_activations` permutes the activations to match)."""
        dt: gl.constexpr = xlo.dtype
        MAGIC: gl.constexpr = 0x4300 if dt == gl.bfloat16 else 0x6400
        HALF: gl.constexpr = qb.shape[1] // NC   # this warpgroup's rows: ROWS / NC
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BM, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        acc = gl.zeros([HALF, BM], gl.float32, mma)
        for kt in range(k_chunks):
            it = it0 + kt
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            if WPERM:   # column 8a + 2t + b reads word 4t + 2a + b: 16 contiguous bytes a thread
                q = (qb.index(s).reshape([NC * HALF, 4, 2, 2]).permute((0, 2, 1, 3))
                     .reshape([NC * HALF, 16]).slice(HALF * WG, HALF).load(a_l))
            else:
                q = qb.index(s).slice(HALF * WG, HALF).load(a_l)           # [HALF, 16] words
            sz = (szb.index(s).reshape([NC * HALF]).slice(HALF * WG, HALF)
                  .load(gl.SliceLayout(1, a_l)))
            if SZ == 0:
                sv = gl.expand_dims(sz, 1)
                sc = gl.broadcast(sv, q)[0].to(gl.int16).to(dt, bitcast=True)        # low half
                zt = gl.broadcast(sv >> 16, q)[0].to(gl.int16).to(dt, bitcast=True)  # high half
            else:
                sc = gl.broadcast(gl.expand_dims(sz, 1), q)[0]
                zt = sc   # symmetric: the asm takes no zero term
                if SZ == 2:   # magic + z: the asm subtracts it (A0-A3 are the offset asm)
                    zw = (zb.index(s).reshape([NC * HALF]).slice(HALF * WG, HALF)
                          .load(gl.SliceLayout(1, a_l)))
                    zo = ((zw >> (4 * ((kt0 + kt) % 8))) & 0xF) | MAGIC
                    zt = gl.broadcast(gl.expand_dims(zo, 1), q)[0].to(gl.int16).to(
                        dt, bitcast=True)
            lo0, hi0 = _planes(q, sc, zt, A0)
            lo1, hi1 = _planes(q, sc, zt, A1)
            lo2, hi2 = _planes(q, sc, zt, A2)
            lo3, hi3 = _planes(q, sc, zt, A3)
            xl = xlo.index(s)
            xh = xhi.index(s)
            # plane i is k = 16 i .. 16 i + 15 of the chunk: planes 0-3 in the low box
            acc = warpgroup_mma(lo0, xl.slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi0, xl.slice(16, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(lo1, xl.slice(32, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi1, xl.slice(48, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(lo2, xh.slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi2, xh.slice(16, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(lo3, xh.slice(32, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi3, xh.slice(48, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(s))
        rn = off_n + HALF * WG + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
        if HAS_BIAS:
            bias = gl.load(bias_ptr + rn, mask=rn < N).to(gl.float32)
            if ATOMIC:   # the first K slice adds it
                bias = bias * (pid_k == 0).to(gl.float32)
            acc += gl.expand_dims(bias, 1)
        val = acc.to(out_ptr.dtype.element_ty)   # ATOMIC: the fp16 output or a float32 buffer
        if COAL:
            ep: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
            val = gl.convert_layout(val, ep)
            rn = off_n + HALF * WG + gl.arange(0, HALF, layout=gl.SliceLayout(1, ep))
            rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, ep))
        else:
            rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        ptrs = out_ptr + gl.expand_dims(rm, 0) * stride_om + gl.expand_dims(rn, 1)
        mask = (gl.expand_dims(rn, 1) < N) & (gl.expand_dims(rm, 0) < M)
        if ATOMIC:   # split-K: add into the zeroed output
            if PDL:
                _gdc_wait()
            gl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
        else:
            gl.store(ptrs, val, mask=mask)

    @gluon.jit
    def _gdc_wait():
        """griddepcontrol.wait: until the grids this launch depends on (PDL) have finished and
        their writes are visible; a no-op in a launch without PDL."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _tile(t, num_pn, num_pm, GROUP_N: gl.constexpr, BM: gl.constexpr,
              ROWS: gl.constexpr):
        """(first row, first token) of output tile t, in the fused kernel's order
        (:func:`~.dequant._tile_of`)."""
        pid_n, pid_m = _tile_of(t, num_pn, num_pm, GROUP_N)
        return pid_n * ROWS, pid_m * BM

    @gluon.jit
    def _work(num_tiles, k_chunks, STREAM: gl.constexpr):
        """The program's first tile, the tile past its last and its step, and (STREAM) its run
        [u0, u1) of the tiles' chunks numbered tile after tile."""
        pid = gl.program_id(0)
        progs = gl.num_programs(0)
        if STREAM:   # equal runs of chunks: a tile may be split between neighbouring programs
            u0 = pid * (num_tiles * k_chunks) // progs
            u1 = (pid + 1) * (num_tiles * k_chunks) // progs
            return u0 // k_chunks, gl.cdiv(u1, k_chunks), 1, u0, u1
        return pid, num_tiles, progs, 0, 0

    @gluon.jit
    def _chunks(t, u0, u1, k_chunks, STREAM: gl.constexpr):
        """Tile t's chunks in the run [u0, u1) (STREAM; else all of them): the first and the
        number."""
        if STREAM:
            kt0 = gl.maximum(u0 - t * k_chunks, 0)
            return kt0, gl.minimum(u1 - t * k_chunks, k_chunks) - kt0
        return 0, k_chunks

    @gluon.jit
    def _producer_tiles(x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb, ready, empty,
                        num_pn, num_pm, k_chunks, GROUP_N: gl.constexpr, BM: gl.constexpr,
                        STAGES: gl.constexpr, STREAM: gl.constexpr, TILED: gl.constexpr,
                        SZ: gl.constexpr, TR: gl.constexpr, NR):
        """PERSIST: the program's tiles p, p + P, ... one after another through one ring, so
        the next tile's first chunks load while the consumers finish and store this one.
        STREAM: the program's run of chunks (:func:`_work`), tile by tile."""
        t0, t1, step, u0, u1 = _work(num_pn * num_pm, k_chunks, STREAM)
        it0 = 0
        for t in range(t0, t1, step):
            off_n, off_m = _tile(t, num_pn, num_pm, GROUP_N, BM, qb.shape[1])
            kt0, n = _chunks(t, u0, u1, k_chunks, STREAM)
            _producer(x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb, ready, empty,
                      off_n, off_m, kt0, n, it0, STAGES, TILED, k_chunks, SZ, TR, NR)
            it0 += n

    @gluon.jit
    def _consumer_tiles(xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om, M,
                        N, num_pn, num_pm, k_chunks, WG: gl.constexpr, GROUP_N: gl.constexpr,
                        BM: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                        A0: gl.constexpr, A1: gl.constexpr, A2: gl.constexpr,
                        A3: gl.constexpr, COAL: gl.constexpr, STREAM: gl.constexpr,
                        PDL: gl.constexpr, SZ: gl.constexpr, NC: gl.constexpr = 2,
                        WPERM: gl.constexpr = False):
        """PERSIST / STREAM: :func:`_consumer` for each of the program's tiles (STREAM: its
        chunks of them, added with atomics; the bias with a tile's first chunk), in the
        producer's order."""
        t0, t1, step, u0, u1 = _work(num_pn * num_pm, k_chunks, STREAM)
        it0 = 0
        for t in range(t0, t1, step):
            off_n, off_m = _tile(t, num_pn, num_pm, GROUP_N, BM, qb.shape[1])
            kt0, n = _chunks(t, u0, u1, k_chunks, STREAM)
            _consumer(xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om, M, N,
                      off_n, off_m, kt0, kt0, n, it0, WG, BM, STAGES, HAS_BIAS, STREAM, A0, A1,
                      A2, A3, COAL, PDL, SZ, NC, WPERM)
            it0 += n

    @gluon.jit
    def w4a16_ws_kernel(x_desc, q_desc, sz_desc, z_desc, out_ptr, bias_ptr, M, N, K, stride_om,
                        SPLIT_K, BM: gl.constexpr, STAGES: gl.constexpr,
                        GROUP_N: gl.constexpr, HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr,
                        A0: gl.constexpr, A1: gl.constexpr, A2: gl.constexpr,
                        A3: gl.constexpr, PERSIST: gl.constexpr = False,
                        COAL: gl.constexpr = False, REGS: gl.constexpr = 232,
                        STREAM: gl.constexpr = False, TILED: gl.constexpr = False,
                        PDL: gl.constexpr = False, SZ: gl.constexpr = 0,
                        NC: gl.constexpr = 2, TR: gl.constexpr = 0, NR=0,
                        WPERM: gl.constexpr = False):
        """Program (p, pid_k): K slice pid_k of output tile p, the tiles taken GROUP_N row tiles
        at a time over all token tiles (as the fused kernel); see the module docstring. With
        ATOMIC (SPLIT_K > 1) the slices add into the output with atomics. PERSIST (a 1-D grid
        of fewer programs than tiles, no split): program p takes tiles p, p + P, ... through one
        ring (:func:`_producer_tiles`). STREAM (stream-K; with ATOMIC and a 1-D grid): the
        tiles' chunks in equal runs, one per program, partial tiles added with atomics
        (:func:`_work`). TILED: q_desc views words laid out in row blocks of TR, NR rows in
        all (:func:`_producer`). COAL: the coalesced
        epilogue (:func:`_consumer`). PDL (with ATOMIC): launched with ``launch_pdl`` right
        after :func:`~.pdl.zero_`'s kernel, it waits for that before adding. SZ: the scales'
        layout (:func:`w4a16_ws`; z_desc, the zero-point words, is read with SZ 2). REGS:
        the second consumer warpgroup's registers per thread (the first takes what the launch's
        maxnreg leaves); below 232 the producer keeps 24. NC: consumer warpgroups, 2 (ROWS / 2
        rows each) or 4 (64 rows each of a 256-row tile; REGS for the three worker ones)."""
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        ROWS: gl.constexpr = q_desc.block_type.shape[0]
        num_pn = gl.cdiv(N, ROWS)
        num_pm = gl.cdiv(M, BM)
        off_n, off_m = _tile(pid, num_pn, num_pm, GROUP_N, BM, ROWS)
        if ATOMIC and not STREAM:   # K slice pid_k of SPLIT_K
            kt_total, kt0, kt1 = _k_slice(K, pid_k, SPLIT_K)
            k_chunks = kt1 - kt0
            if k_chunks <= 0:   # an empty last slice (slice 0 of the tile waits for PDL)
                return
        else:
            kt0 = 0
            k_chunks = gl.cdiv(K, 128)

        dt: gl.constexpr = x_desc.dtype
        xlo = gl.allocate_shared_memory(dt, [STAGES, BM, 64], x_desc.layout)
        xhi = gl.allocate_shared_memory(dt, [STAGES, BM, 64], x_desc.layout)
        qb = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, 16], q_desc.layout)
        szb = gl.allocate_shared_memory(sz_desc.dtype, [STAGES, 1, ROWS], sz_desc.layout)
        if SZ == 2:
            zb = gl.allocate_shared_memory(gl.int32, [STAGES, 1, ROWS], z_desc.layout)
        else:
            zb = szb   # not read
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)

        # the producer keeps 24-40 registers; with 4 consumers (17 warps, padded to 20) the
        # launch has 96 per thread and setmaxnreg gives the consumers 120. The partition lists
        # are spelled out: an argument tuple held in a variable turns its constexprs (the asm
        # strings, BM, ...) into tensors in Triton 3.6, so it cannot be built once and reused
        PREG: gl.constexpr = 40 if REGS > 128 else 24
        if PERSIST or STREAM:
            if NC == 4:
                gl.warp_specialize([
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 0, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, NC, WPERM)),
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 1, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, NC, WPERM)),
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 2, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, NC, WPERM)),
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 3, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, NC, WPERM)),
                    (_producer_tiles, (x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb,
                                       ready, empty, num_pn, num_pm, k_chunks, GROUP_N, BM,
                                       STAGES, STREAM, TILED, SZ, TR, NR)),
                ], [4, 4, 4, 1], [REGS, REGS, REGS, 24])
            else:
                gl.warp_specialize([
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 0, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, 2, WPERM)),
                    (_consumer_tiles, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr,
                                       stride_om, M, N, num_pn, num_pm, k_chunks, 1, GROUP_N,
                                       BM, STAGES, HAS_BIAS, A0, A1, A2, A3, COAL, STREAM, PDL,
                                       SZ, 2, WPERM)),
                    (_producer_tiles, (x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb,
                                       ready, empty, num_pn, num_pm, k_chunks, GROUP_N, BM,
                                       STAGES, STREAM, TILED, SZ, TR, NR)),
                ], [4, 1], [REGS, PREG])
            return
        kc_all = gl.cdiv(K, 128)
        if NC == 4:
            gl.warp_specialize([
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 0, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, NC, WPERM)),
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 1, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, NC, WPERM)),
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 2, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, NC, WPERM)),
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 3, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, NC, WPERM)),
                (_producer, (x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb, ready,
                             empty, off_n, off_m, kt0, k_chunks, 0, STAGES, TILED, kc_all, SZ, TR,
                             NR)),
            ], [4, 4, 4, 1], [REGS, REGS, REGS, 24])
        else:
            gl.warp_specialize([
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 0, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, 2, WPERM)),
                (_consumer, (xlo, xhi, qb, szb, zb, ready, empty, out_ptr, bias_ptr, stride_om,
                             M, N, off_n, off_m, pid_k, kt0, k_chunks, 0, 1, BM, STAGES,
                             HAS_BIAS, ATOMIC, A0, A1, A2, A3, COAL, PDL, SZ, 2, WPERM)),
                (_producer, (x_desc, q_desc, sz_desc, z_desc, xlo, xhi, qb, szb, zb, ready,
                             empty, off_n, off_m, kt0, k_chunks, 0, STAGES, TILED, kc_all, SZ, TR,
                             NR)),
            ], [4, 1], [REGS, PREG])


_TILED = WeakIdKeyDictionary()


def tiled_words(qweight: torch.Tensor, rows: int, build: bool = True) -> torch.Tensor | None:
    """The packed words [N, K/8] laid out tile by tile for the ``TILED`` option: row block
    (``rows`` rows, the last zero-padded), then 128-deep K chunk, then the chunk's [rows, 16]
    words, as one [ceil(N / rows) * K/128 * rows, 16] tensor, so that each tensor copy reads
    ``rows`` x 64 contiguous bytes instead of ``rows`` runs of 64. Built once per weight and
    row count (a configs table that serves a shape with 128- and 256-row TILED tiles keeps two)
    and kept while the weight lives; rebuilt when the weight is written through an operation
    that bumps its version counter (``copy_``, in-place arithmetic) or moves, not after writes
    that bypass it (``.data`` assignments, raw pointers). ``build=False``: None where no copy
    is there yet."""

    def make():   # tile_words of the words zero-padded to whole blocks (fresh storage)
        pad = -qweight.shape[0] % rows
        q = torch.nn.functional.pad(qweight, (0, 0, 0, pad)) if pad else qweight
        return tile_words(q, rows).view(-1, 16)

    return cached_layout(_TILED, qweight, (qweight._version, qweight.data_ptr()), rows, make,
                         build)


def wperm_activations(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] with K permuted inside each 16-wide block as the ``WPERM`` consumers read the
    words: column 8a + 2t + b of a block takes column 4t + 2a + b (a < 2, t < 4, b < 2), the
    same reshape / permute the kernel applies to its shared-memory word tile. A new
    contiguous tensor."""
    m, k = x2.shape
    return x2.reshape(m, k // 16, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(m, k).contiguous()


def _regs(cfg: dict, rows: int, bm: int) -> dict:
    """The launch options for a config's MAXNREG (registers per thread, the key the GEMV path
    uses too; none: the compiler's defaults, 168 for the 384 threads). Only for tiles
    of 128 rows and at most 64 tokens, whose accumulators (32 registers a thread at 64 tokens)
    leave room; larger tiles keep the whole register file (at 80, a 256-row tile of 64 tokens
    spills and runs 10-30x slower)."""
    regs = int(cfg.get("MAXNREG", 0))
    if regs and not 64 <= regs <= 168:
        raise ValueError(f"WS config MAXNREG={regs}: registers per thread must be 64-168 (80 lets "
                         "two programs share an SM; leave MAXNREG out for the default, 168)")
    return dict(REGS=regs, maxnreg=regs) if regs and rows == ROWS and bm <= 64 else {}


def _consumers(cfg: dict, rows: int, bm: int) -> dict:
    """The consumer warpgroups' launch options: WGS 4 splits a 256-row tile over four consumer
    warpgroups of 64 rows (17 warps, 120 registers each: more warps to hide the dequantization's
    latency behind, at most 64 tokens so that the accumulator fits); else two, and
    :func:`_regs`."""
    wgs = int(cfg.get("WGS", 2))
    if wgs not in (2, 4):
        raise ValueError(f"WS config WGS={wgs}: consumer warpgroups must be 2 or 4")
    if wgs == 4:
        if rows != 256 or bm > 64:
            raise ValueError(f"WS config WGS=4 needs BN 256 and at most 64 tokens per tile "
                             f"(got {rows} rows, BM {bm}): four 64-row warpgroups at 120 "
                             "registers each hold a [64, 64] accumulator at most")
        return dict(NC=4, REGS=120)
    return _regs(cfg, rows, bm)


@functools.lru_cache(maxsize=None)
def _dequant_asm(bf16: bool, zero: bool, zero_offset: bool = False, odd_shift: bool = False,
                 swapped: bool = False, shift: bool = False):
    """The consumer's four byte asm strings (``dequant._asm``; ``swapped``: tiled words, whose
    pairs' bytes are swapped, ``packing.swap_pair_bytes``, gathered by a move or a shift with
    ``shift``, else by one PRMT)."""
    return tuple(gl.constexpr(_asm(bf16, zero, b, zero_offset, odd_shift, swapped, shift))
                 for b in range(4))


def ws_rows(cfg: dict) -> int:
    """Rows per program of a WS config: 256 with BN 256, else 128."""
    return 256 if cfg.get("BN") == 256 else ROWS


def ws_supported(x2: torch.Tensor, p, cfg: dict | None = None) -> bool:
    """Whether ``w4a16_ws_kernel`` can run ``x2 [M, K] @ p``: Gluon present, a GPU of compute
    capability 9.0 (wgmma), block 128, K a multiple of 128, N a multiple of 4 (the transposed
    pairs' rows), 16-byte aligned bases and rows for the tensor copies, and (``cfg`` given)
    tiled words in row blocks that hold whole tiles of the config's rows."""
    if not HAVE_GLUON or x2.device.type != "cuda":
        return False
    if cfg is not None and p.tile_rows % ws_rows(cfg):
        return False
    n, k = p.shape
    q = p.qweight
    return (ws_shape_ok(n, k, p.group_size, torch.cuda.get_device_capability(x2.device))
            and x2.stride(-1) == 1
            and x2.data_ptr() % 16 == 0 and (x2.stride(0) * x2.element_size()) % 16 == 0
            and q.is_contiguous() and q.data_ptr() % 16 == 0)


def _coal_fits(rows: int, bm: int, stages: int, x_size: int, out_size: int,
               sz_size: int = 4) -> bool:
    """Whether the coalesced epilogue's layout conversion fits in shared memory beside the
    ring, with room to spare: Triton converts 16-bit tiles through about 4 KB whatever the
    tile (sm_90a, Triton 3.6: 3.9-4.3 KB from 16 to 256 tokens; 8 KB are counted), float32
    ones through up to 32 KB (a whole [rows, BM] float32 tile is counted).
    ``tests/test_kernel_codegen.py`` compiles rings at the limit: 256 tokens x 3 stages and 256
    rows x 64 tokens x 6 stages."""
    ring = stages * (2 * bm * 64 * x_size + rows * 16 * 4 + rows * sz_size)
    return ring + (8192 if out_size == 2 else rows * bm * 4) <= SMEM


def _launch(cfg: dict, tiles: int, chunks: int, sms: int) -> tuple:
    """(grid, K split, persistent, stream-K) for ``tiles`` output tiles of ``chunks`` K chunks
    each: SPLIT_K programs per tile; or PERSIST / STREAM programs per SM (PROGRAMS in all, if
    given), never more than there are tiles (PERSIST) or chunks (STREAM). STREAM numbers the
    chunks of all tiles in int32 (run bounds up to programs x tiles x chunks): beyond that it
    falls back to PERSIST, which walks the same tiles whole."""
    stream = int(cfg.get("STREAM", 0))
    persist = 0 if stream else int(cfg.get("PERSIST", 0))
    split = 1 if persist or stream else max(1, min(int(cfg.get("SPLIT_K", 1)), chunks))
    if not (persist or stream):
        return (tiles, split), split, False, False
    programs = int(cfg.get("PROGRAMS", 0)) or (persist or stream) * sms
    if stream and (programs + 1) * tiles * chunks >= 2**31:
        persist, stream = stream, 0
    units = tiles * chunks if stream else tiles
    return (max(1, min(units, programs)), 1), 1, bool(persist), bool(stream)


def w4a16_ws(x2: torch.Tensor, p, scales: tuple, bias: torch.Tensor | None,
             cfg: dict) -> torch.Tensor:
    """y [M, N] = x2 @ W_hat^T (+ bias) with the warp-specialized kernel; ``scales`` is
    :func:`~.ops.ws_scales` of ``p``: (0, :func:`~.packing.pair_scales` transposed [K/128, N],
    None), (1, the scales transposed, None) for symmetric weights or (2, the scales
    transposed, :func:`~.packing.zero_words`) for integer zero points. Config keys: BM (token tile,
    clipped to the tokens' power of two, >= 16), BN (rows per program: 128, or 256, which caps
    BM at 128), STAGES (ring depth, default 3; 256-token tiles fit 3 in shared memory), GROUP_N
    (default 8), SPLIT_K (default 1: K slices added with atomics into a float32 buffer, or with
    OUT16 and fp16 activations straight into the output), PERSIST (programs per SM walking the
    tiles, or PROGRAMS in all; no split), STREAM (stream-K: programs per SM, or PROGRAMS in
    all, each taking an equal run of the tiles' K chunks and adding its partial tiles with
    atomics into a zeroed output, as SPLIT_K does; instead of PERSIST and SPLIT_K), COAL (the
    coalesced epilogue; default on with a split or STREAM, where shared memory allows), TILED
    (the words in :func:`tiled_words`' layout, a cached copy per row count; only after
    :func:`~.tuning.allow_tiled_copies`, else ignored), MAXNREG (registers per thread for the
    whole program, e.g. 80: 384 threads x 80 leave room for a second program per SM where
    shared memory does too; default: all 168 the register file allows one program; only for
    128-row tiles of at most 64 tokens), WGS (4: the 256-row tile over four 64-row consumer
    warpgroups instead of two of 128, more warps to hide the dequantization behind; BN 256 and
    at most 64 tokens, :func:`_consumers`), ODD_SHIFT (the odd nibble planes shifted before
    their mask, one instruction more per weight pair; :func:`~.dequant._asm`, kept for A/B
    timings), WPERM (each consumer thread reads its words of a row as one 16-byte load instead of
    two 8-byte ones, which the swizzled word tile serves without bank conflicts, by taking
    word 4t + 2a + b for the A-layout column 8a + 2t + b; the activations' K is permuted the
    same way inside each 16-wide block first, :func:`wperm_activations`; an experiment, slower
    end to end: the kernel gains 1-2 % at 64-256 tokens but the activations' permutation is
    one more copy per call, see ``benchmarks/kernels/NOTES.md``, v48c). Tiled words (TILED or
    ``PackedInt4.tile_rows``) have their pairs byte-swapped (``packing.swap_pair_bytes``):
    GATHER "shift" takes byte b of a pair with a move or an 8-bit shift instead of a PRMT
    (v49: 3-4 % faster at 64 tokens on the large shapes, 0.5-1 % slower at 16 and 256; ignored
    for row-by-row words). Call :func:`ws_supported` first."""
    m, k = x2.shape
    n = p.shape[0]
    wperm = bool(cfg.get("WPERM", False))
    if wperm:
        x2 = wperm_activations(x2)
    bm = min(int(cfg.get("BM", 256)), max(16, 1 << (m - 1).bit_length()))
    stages = int(cfg.get("STAGES", 3))
    rows = ws_rows(cfg)
    if rows == 256:   # a 128-row warpgroup's accumulator: 128 registers at 128 tokens
        bm = min(bm, 128)
    grid, split, persist, stream = _launch(cfg, -(-n // rows) * -(-m // bm), k // 128,
                                           _num_sms(x2.device))
    atomic = split > 1 or stream
    dt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [bm, 64],
                              gl.NVMMASharedLayout.get_default_for([bm, 64], dt))
    q_l = gl.NVMMASharedLayout.get_default_for([rows, 16], gl.int32)
    qt, tr, nr = None, 0, 0
    if p.tile_rows:   # words laid out in row blocks (packing.tile_words): read in place
        qt, tr, nr = p.qweight.view(-1, 16), p.tile_rows, n
        if tr % rows:
            raise ValueError(f"words tiled in blocks of {tr} rows cannot feed {rows}-row tiles; "
                             f"tile them in blocks of a multiple of {rows} (packing.tile_words)")
    elif cfg.get("TILED") and tiled_copies_allowed():
        # under CUDA-graph capture a copy would only be recorded, not made: use one made before
        capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
        qt = tiled_words(p.qweight, rows, build=not capturing)
        if qt is not None:   # blocks of `rows`, the last one zero-padded
            tr, nr = rows, qt.shape[0] // (k // 128)
    tiled = qt is not None
    if tiled:
        q_desc = TensorDescriptor(qt, list(qt.shape), [16, 1], [rows, 16], q_l)
    else:
        q_desc = TensorDescriptor(p.qweight, [n, k // 8], [k // 8, 1], [rows, 16], q_l)
    mode, s_t, z_t = scales
    w_l = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    sz_desc = TensorDescriptor(s_t, [k // 128, n], [n, 1], [1, rows], w_l if mode == 0 else
                               gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16,
                                                    rank=2))
    z_desc = (TensorDescriptor(z_t, list(z_t.shape), [n, 1], [1, rows], w_l) if mode == 2
              else sz_desc)
    a0, a1, a2, a3 = _dequant_asm(x2.dtype == torch.bfloat16, p.zterm is not None, mode == 2,
                                  bool(cfg.get("ODD_SHIFT")), tiled,
                                  tiled and cfg.get("GATHER") == "shift")
    out16 = atomic and cfg.get("OUT16", False) and x2.dtype == torch.float16
    out = torch.empty((m, n), device=x2.device,
                      dtype=x2.dtype if not atomic or out16 else torch.float32)
    # zeroed last: the PDL launch below must follow the zeroing kernel directly
    pdl = zero_(out) if atomic else False
    coal = bool(cfg.get("COAL", atomic)) and _coal_fits(
        rows, bm, stages, x2.element_size(), out.element_size(), (4, 2, 6)[mode])
    try:
        w4a16_ws_kernel[grid](x_desc, q_desc, sz_desc, z_desc, out,
                              bias if bias is not None else out,
                              m, n, k, out.stride(0), split, BM=bm, STAGES=stages,
                              GROUP_N=int(cfg.get("GROUP_N", 8)), HAS_BIAS=bias is not None,
                              ATOMIC=atomic, A0=a0, A1=a1, A2=a2, A3=a3, PERSIST=persist,
                              COAL=coal, STREAM=stream, TILED=tiled, SZ=mode, TR=tr, NR=nr,
                              WPERM=wperm,
                              num_warps=4,
                              **launch_options(pdl), **_consumers(cfg, rows, bm))
    except OutOfResources as err:   # a hand-written config whose ring does not fit
        raise ValueError(
            f"WS config {dict(cfg)} for a [{m}, {k}] x [{k}, {n}] product needs more "
            f"{err.name} than the GPU has ({err.required} > {err.limit}): lower STAGES "
            f"(ring depth, now {stages}) or BM (token tile, now {bm})") from err
    return out if out.dtype == x2.dtype else out.to(x2.dtype)
