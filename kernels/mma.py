"""Small-M path (2..16 tokens per program): ``w4a16_mma_kernel`` dequantizes every packed
word once into ``mma.sync`` m16n8k16 register fragments (inline PTX built by :func:`mma_asm`
/ :func:`mma_fs_asm`) and multiplies it with all the tokens, no shared memory and no barrier;
``xperm_prep_kernel`` lays the activations out for its 16-byte fragment loads (``XPERM``).
"""
import triton
import triton.language as tl

from .dequant import _chunk_scale_zero, _dequant_byte, _half


@triton.jit
def xperm_prep_kernel(x_ptr, xp_ptr, out_ptr, M, K, stride_xm, n_out, zero_per_prog,
                      TB: tl.constexpr, BLOCK: tl.constexpr):
    """One launch before the MMA path's split-K kernel: x [M, K] re-laid out as
    :func:`~.ops.permute_x` (token block ``TB``, zero padding) and, with ``n_out`` > 0, the
    split-K output zeroed (``zero_per_prog`` elements per program, a multiple of BLOCK).

    Program (mb, kt) writes the 128 TB contiguous halves of token block mb and chunk kt:
    element d = ((j TB + r) 4 + t) 8 + 4 h + e comes from token mb TB + r, column
    128 kt + 32 j + 16 h + 4 t + e.
    """
    mb = tl.program_id(0)
    kt = tl.program_id(1)
    d = tl.arange(0, 128 * TB)
    e = d % 4
    h = (d // 4) % 2
    t = (d // 8) % 4
    r = (d // 32) % TB
    j = d // (32 * TB)
    row = mb * TB + r
    col = kt * 128 + 32 * j + 16 * h + 4 * t + e
    v = tl.load(x_ptr + row * stride_xm + col, mask=(row < M) & (col < K), other=0.0)
    tl.store(xp_ptr + (mb * tl.num_programs(1) + kt) * (128 * TB) + d, v)
    if n_out > 0:
        pid = mb * tl.num_programs(1) + kt
        z = tl.zeros([BLOCK], out_ptr.dtype.element_ty)
        for start in range(pid * zero_per_prog, (pid + 1) * zero_per_prog, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, z, mask=offs < n_out)


_FRAG_SRC = ((0, 0), (1, 0), (0, 2), (1, 2))   # (slot, first word) of A fragments a0..a3


def _x_address_ptx(xperm: bool, n_tiles: int, xaddr: str, mm1: str, stride: str) -> list[str]:
    """PTX: lane, g, tt and each token tile's activation address xa0 / xa1 (see mma_asm)."""
    lines = ["mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 tt, lane, 3;"]
    if xperm:  # lane (g, t): byte 64 g + 16 t of each load's block; tile 1 is 8 tokens on
        return lines + ["mul.wide.u32 off, lane, 16;", f"add.s64 xa0, {xaddr}, off;",
                        "add.s64 xa1, xa0, 512;"]
    lines += [f"min.u32 tok, g, {mm1};", f"mul.wide.u32 off, tok, {stride};",
              f"add.s64 xa0, {xaddr}, off;", "mul.wide.u32 off, tt, 8;",
              "add.s64 xa0, xa0, off;"]
    if n_tiles == 2:
        lines += ["add.u32 tok, g, 8;", f"min.u32 tok, tok, {mm1};",
                  f"mul.wide.u32 off, tok, {stride};", f"add.s64 xa1, {xaddr}, off;",
                  "mul.wide.u32 off, tt, 8;", "add.s64 xa1, xa1, off;"]
    return lines


def _prmt_ptx(b: int, rows: int, q: list[str]) -> list[str]:
    """PTX: byte b of each A fragment's word pair into the halves of p{pair}_{fragment}."""
    sel = hex(b | b << 4 | (4 + b) << 8 | (4 + b) << 12)
    return [f"prmt.b32 p{pr}_{f}, {q[4 * (2 * pr + slot) + w]}, "
            f"{q[4 * (2 * pr + slot) + w + 1]}, {sel};"
            for pr in range(rows // 2) for f, (slot, w) in enumerate(_FRAG_SRC)]


def _x_load_ptx(i: int, tile: int, n_tiles: int, xperm: bool, even_k: bool,
                krem: str) -> list[str]:
    """PTX: the B fragment (x{tile}_0, x{tile}_1) of nibble plane i for one token tile."""
    xb = f"x{tile}_0, x{tile}_1"
    if xperm:  # one 16-byte load per plane pair: (plane 2b: r0, r1; 2b+1: r2, r3)
        if i % 2 == 0:
            return [f"ld.global.nc.v4.b32 {{{xb}, y{tile}_0, y{tile}_1}}, "
                    f"[xa{tile}+{(i // 2) * 64 * 8 * n_tiles}];"]
        return [f"mov.b32 x{tile}_0, y{tile}_0;", f"mov.b32 x{tile}_1, y{tile}_1;"]
    if even_k:
        return [f"ld.global.nc.v2.b32 {{{xb}}}, [xa{tile}+{32 * i}];"]
    # planes past K read zeros (their padding codes are not zero weights)
    return [f"mov.b32 x{tile}_0, 0;", f"mov.b32 x{tile}_1, 0;",
            f"setp.lt.s32 pk, {16 * i}, {krem};",
            f"@pk ld.global.nc.v2.b32 {{{xb}}}, [xa{tile}+{32 * i}];"]


def mma_asm(bf16: bool, zero: bool, groups_per_chunk: int, n_tiles: int, even_k: bool,
            rows: int = 2, xperm: bool = False) -> str:
    """One chunk (128 k) of the small-M tensor-core GEMV for one thread: ``rows`` rows x 4 words.

    Thread layout (the [BN, 16] int32 tile's blocked layout: 4 consecutive words of a row
    per thread, 8 x 4 threads per warp, BN = 8 rows num_warps): lane = 4 g + t holds words
    4t .. 4t+3 of its rows (slots 0 .. rows-1). That is the A-fragment layout of
    ``mma.m16n8k16`` with mma rows (g, g + 8) = slots (2p, 2p + 1) and, for nibble plane i,
    mma k (2t, 2t+1) = words (4t, 4t+1) and k (2t+8, 2t+9) = words (4t+2, 4t+3): K is a
    sum, so any fixed permutation of it works when the activations follow it. One PRMT per
    word pair and byte puts byte b of both words in the two halves of a register; LOP3 with
    the half-precision magic gives plane 2b (then plane 2b+1 after a shift) as f16x2; a
    packed subtract and FMA with (scale, zterm) finish the weight, exactly as in :func:`_asm`.
    The B fragment of plane i is x[token][16i + 4t .. 16i + 4t + 3], one 8-byte load per
    token tile (tokens g and g + 8, clamped to M - 1), addressed from %laneid and shared by
    the thread's row pairs. Each word is dequantized once and used by every token.

    Operands (pack 4 rows): the accumulators out, 4 per slot: (tile 0 c0, c1, tile 1 c0, c1)
    for slot 2p, (tile 0 c2, c3, tile 1 c2, c3) for slot 2p + 1, i.e. column c = 4t + j holds
    token 2t + (j & 1) + 8 (j >> 1); then the words, 4 scale and 4 zterm tensors (groups of
    the chunk; two half-precision values per register), the accumulators in, the chunk's x
    address (b64), M - 1, the x row stride in bytes and the K left in this chunk.

    With ``xperm`` the activations come pre-permuted once per call (:func:`permute_x`): per
    chunk and load j = 0..3 a [8 n_tiles tokens, 4 t, planes 2j and 2j + 1, 4 halves] block,
    so a lane fetches both planes' B fragments with one 16-byte load and a warp's load reads
    512 contiguous bytes per token tile (4 lines instead of 8 lines for 8 bytes a lane).
    Tokens and K are zero-padded there, so no clamp and no K predicate; the address operand
    is the chunk's block, and M - 1, the stride and the K left are unused.
    """
    n = 4 * rows                        # elements per thread
    ty = "bf16x2" if bf16 else "f16x2"
    ab = "bf16" if bf16 else "f16"
    magic = "0x43004300" if bf16 else "0x64006400"
    offset = magic if zero else ("0x43084308" if bf16 else "0x64086408")
    q = [f"${n + i}" for i in range(n)]
    sbase, zbase, abase = 2 * n, 2 * n + 2 * n, 2 * n + 4 * n
    sreg = [[f"${sbase + (n // 2) * j + 2 * r}" for r in range(rows)] for j in range(4)]
    zreg = [[f"${zbase + (n // 2) * j + 2 * r}" for r in range(rows)] for j in range(4)]
    acc_in = [f"${abase + i}" for i in range(n)]
    xaddr, mm1, stride, krem = (f"${abase + n * (1 + i)}" for i in range(4))
    lines = [f"mov.b32 m, {magic};", f"mov.b32 o, {offset};"]
    lines += [f"mov.b32 ${i}, {acc_in[i]};" for i in range(n)]
    lines += _x_address_ptx(xperm, n_tiles, xaddr, mm1, stride)
    # A fragment sources per row pair p (_FRAG_SRC): (slot, first word) for a0 (row g, k 2t..),
    # a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
    for b in range(4):
        lines += _prmt_ptx(b, rows, q)
        for i in (2 * b, 2 * b + 1):
            grp = {1: 0, 2: i // 4, 4: i // 2}[groups_per_chunk]
            for tile in range(n_tiles):
                lines += _x_load_ptx(i, tile, n_tiles, xperm, even_k, krem)
            for pr in range(rows // 2):
                for f, (slot, _) in enumerate(_FRAG_SRC):
                    sl = 2 * pr + slot
                    src = f"p{pr}_{f}"
                    if i % 2:
                        lines.append(f"shr.u32 {src}, {src}, 4;")
                    lines.append(f"lop3.b32 a{f}, {src}, 0x000F000F, m, 0xEA;")
                    lines.append(f"sub.rn.{ty} a{f}, a{f}, o;")
                    if zero:
                        lines.append(f"fma.rn.{ty} a{f}, a{f}, {sreg[grp][sl]}, "
                                     f"{zreg[grp][sl]};")
                    else:
                        lines.append(f"mul.rn.{ty} a{f}, a{f}, {sreg[grp][sl]};")
                for tile in range(n_tiles):
                    o0, o1 = 8 * pr, 8 * pr + 4      # slots 2p and 2p + 1
                    d = ((o0, o0 + 1, o1, o1 + 1) if tile == 0 else
                         (o0 + 2, o0 + 3, o1 + 2, o1 + 3))
                    dl = ", ".join(f"${v}" for v in d)
                    lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{{dl}}}, "
                                 f"{{a0, a1, a2, a3}}, {{x{tile}_0, x{tile}_1}}, {{{dl}}};")
    body = "\n".join(lines)
    pregs = ", ".join(f"p{pr}_{f}" for pr in range(rows // 2) for f in range(4))
    return f"""
{{
.reg .b32 m, o, {pregs}, a0, a1, a2, a3, x0_0, x0_1, x1_0, x1_1, y0_0, y0_1, y1_0, y1_1;
.reg .b32 lane, g, tt, tok;
.reg .b64 off, xa0, xa1;
.reg .pred pk;
{body}
}}
"""


def mma_fs_asm(bf16: bool, zero: bool, n_tiles: int, even_k: bool, rows: int = 2,
               xperm: bool = False, fold: bool = False) -> str:
    """:func:`mma_asm` with the scale applied in float32 after the products (``FS``; one group
    per chunk, i.e. block >= 128).

    Only the code goes to the tensor cores. FS 1 (``fold`` off): PRMT + LOP3 + one packed
    subtract give (u - 8) exactly (fp16 odd planes: the mask 0x00F000F0 reads 16 (u - 8) in
    place, against activations divided by 16, exact), so no shift and no packed FMA per weight
    pair. FS 2 (``fold``): not even the subtract: the A operand is the magic number plus the
    code as LOP3 leaves it (fp16: 1024 + u, odd planes 1024 + 16 u against x / 16; bf16:
    128 + u), exact in half precision, and the offsets come off in float32 with the sums of x.
    The eight planes of a chunk accumulate into a fresh float32 tile T per row pair and token
    tile, then acc += s T + c_e S_e + c_o S_o, with S_e, S_o the chunk's sums of x per token
    over the even and odd planes (one extra MMA per plane and token tile with an all-ones A,
    shared by all rows) and per row (float32, made by the caller from s and zterm):
    FS 1: c_e = c_o = zterm + 8 s (no S without zero points);
    FS 2, fp16: c_e = zterm - 1024 s, c_o = zterm - 64 s; bf16: c_e = c_o = zterm - 128 s
    (zterm = -8 s without zero points). The weights are never rounded to half precision.

    Operands (pack 4 rows, all 32-bit): the accumulators out (as :func:`mma_asm`), the words,
    s, c_e and c_o per element (element 4 r + w: slot r), the accumulators in, the x address
    (b64), M - 1, the x row stride in bytes and the K left.
    """
    n = 4 * rows
    ty = "bf16x2" if bf16 else "f16x2"
    ab = "bf16" if bf16 else "f16"
    q = [f"${n + i}" for i in range(n)]
    sreg = [f"${2 * n + 4 * r}" for r in range(rows)]
    ereg = [f"${3 * n + 4 * r}" for r in range(rows)]
    oreg = [f"${4 * n + 4 * r}" for r in range(rows)]
    acc_in = [f"${5 * n + i}" for i in range(n)]
    xaddr, mm1, stride, krem = (f"${6 * n + n * i}" for i in range(4))
    sums = zero or fold                  # S needed
    split_s = fold and not bf16          # separate S_e / S_o
    lines = ["mov.b32 m, " + ("0x43004300;" if bf16 else "0x64006400;"),
             "mov.b32 o, " + ("0x43084308;" if bf16 else "0x64086408;"),
             "mov.b32 o16, 0x64806480;", "mov.b32 d16, 0x2C002C00;",
             "mov.b32 one, " + ("0x3F803F80;" if bf16 else "0x3C003C00;"), "mov.b32 zf, 0;"]
    lines += [f"mov.b32 ${i}, {acc_in[i]};" for i in range(n)]
    lines += _x_address_ptx(xperm, n_tiles, xaddr, mm1, stride)
    zq = "{zf, zf, zf, zf}"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    for b in range(4):
        lines += _prmt_ptx(b, rows, q)
        for i in (2 * b, 2 * b + 1):
            odd16 = i % 2 == 1 and not bf16     # fp16 odd plane read in place (16 u)
            for tile in range(n_tiles):
                xb = f"x{tile}_0, x{tile}_1"
                lines += _x_load_ptx(i, tile, n_tiles, xperm, even_k, krem)
                if sums:  # S += ones x: the sums of x per token (all rows alike)
                    h = "o" if split_s and i % 2 else "e"
                    sq = ", ".join(f"s{h}{tile}_{e}" for e in range(4))
                    cin = zq if i < (2 if split_s else 1) else f"{{{sq}}}"
                    lines.append(f"{mma} {{{sq}}}, {{one, one, one, one}}, {{{xb}}}, {cin};")
                if odd16:
                    lines += [f"mul.rn.f16x2 x{tile}_0, x{tile}_0, d16;",
                              f"mul.rn.f16x2 x{tile}_1, x{tile}_1, d16;"]
            for pr in range(rows // 2):
                for f in range(4):
                    src = f"p{pr}_{f}"
                    if odd16:
                        lines.append(f"lop3.b32 a{f}, {src}, 0x00F000F0, m, 0xEA;")
                        if not fold:
                            lines.append(f"sub.rn.{ty} a{f}, a{f}, o16;")
                    else:
                        if i % 2:
                            lines.append(f"shr.u32 {src}, {src}, 4;")
                        lines.append(f"lop3.b32 a{f}, {src}, 0x000F000F, m, 0xEA;")
                        if not fold:
                            lines.append(f"sub.rn.{ty} a{f}, a{f}, o;")
                for tile in range(n_tiles):
                    t = ", ".join(f"t{pr}_{tile}_{e}" for e in range(4))
                    cin = zq if i == 0 else f"{{{t}}}"
                    lines.append(f"{mma} {{{t}}}, {{a0, a1, a2, a3}}, {{x{tile}_0, x{tile}_1}}, "
                                 f"{cin};")
    for pr in range(rows // 2):   # acc += c_e S_e + c_o S_o + s T
        for tile in range(n_tiles):
            o0, o1 = 8 * pr, 8 * pr + 4
            d = ((o0, o0 + 1, o1, o1 + 1) if tile == 0 else (o0 + 2, o0 + 3, o1 + 2, o1 + 3))
            for e in range(4):
                sl = 2 * pr + (e // 2)
                if sums:
                    lines.append(f"fma.rn.f32 ${d[e]}, se{tile}_{e % 2}, {ereg[sl]}, ${d[e]};")
                if split_s:
                    lines.append(f"fma.rn.f32 ${d[e]}, so{tile}_{e % 2}, {oreg[sl]}, ${d[e]};")
                lines.append(f"fma.rn.f32 ${d[e]}, t{pr}_{tile}_{e}, {sreg[sl]}, ${d[e]};")
    body = "\n".join(lines)
    pregs = ", ".join(f"p{pr}_{f}" for pr in range(rows // 2) for f in range(4))
    fregs = [f"t{pr}_{tile}_{e}" for pr in range(rows // 2) for tile in range(n_tiles)
             for e in range(4)]
    fregs += [f"s{h}{tile}_{e}" for h in "eo" for tile in range(2) for e in range(4)]
    return f"""
{{
.reg .b32 m, o, o16, d16, one, zf, {pregs}, a0, a1, a2, a3, x0_0, x0_1, x1_0, x1_1;
.reg .b32 y0_0, y0_1, y1_0, y1_1, lane, g, tt, tok;
.reg .f32 {", ".join(fregs)};
.reg .b64 off, xa0, xa1;
.reg .pred pk;
{body}
}}
"""


def mma_fs_constraints(rows: int = 2) -> str:
    n = 4 * rows
    return ",".join(["=r"] * n + ["r"] * (5 * n) + ["l"] * n + ["r"] * (3 * n))


def mma_constraints(rows: int = 2) -> str:
    n = 4 * rows
    return ",".join(["=r"] * n + ["r"] * n + ["r"] * (2 * n) + ["r"] * (2 * n) + ["r"] * n
                    + ["l"] * n + ["r"] * (3 * n))


@triton.jit
def _load_half_raw(ptrs, USE_ASM: tl.constexpr):
    """A half-precision load in the consumer's layout (see :func:`_load_half`)."""
    if USE_ASM:
        v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int16, is_pure=True, pack=1)
        return v.to(ptrs.dtype.element_ty, bitcast=True)
    return tl.load(ptrs)


@triton.jit
def _mma_scales(s_rows, z_rows, g, n_groups, shape: tl.constexpr, HAS_ZERO: tl.constexpr,
                EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Scale and zterm of group g for the rows, broadcast to the [BN, 16] tile."""
    if not EVEN_K:
        g = tl.minimum(g, n_groups - 1)
    s = tl.broadcast_to(_load_half_raw(s_rows + g, USE_ASM), shape)
    if HAS_ZERO:
        z = tl.broadcast_to(_load_half_raw(z_rows + g, USE_ASM), shape)
    else:
        z = s
    return s, z


@triton.jit
def _load_halves(ptrs, SV: tl.constexpr):
    """SV (2 or 4) consecutive half-precision values from each pointer of ``ptrs`` ([BN, 1]) in
    one 4- or 8-byte inline load (consumer's layout), as SV tensors of the pointee dtype."""
    dt: tl.constexpr = ptrs.dtype.element_ty
    if SV == 2:
        v = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        a = _half(v, dt)
        b = _half(v >> 16, dt)
        return a, b, a, b
    v, w = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                     [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32),
                                     is_pure=True, pack=1)
    return _half(v, dt), _half(v >> 16, dt), _half(w, dt), _half(w >> 16, dt)


@triton.jit
def _load_pairs(ptrs, SV: tl.constexpr, dt: tl.constexpr):
    """SV (2 or 4) consecutive scale / zterm words (:func:`~.packing.pair_scales`) from each
    pointer of ``ptrs`` ([BN, 1]) in one 8- or 16-byte inline load: SV scales, then SV zterms
    (padded to 4 each), as tensors of dtype ``dt``."""
    if SV == 2:
        a, b = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                         [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)
        c, d = a, b
    else:
        a, b, c, d = tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
            [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    return (_half(a, dt), _half(b, dt), _half(c, dt), _half(d, dt),
            _half(a >> 16, dt), _half(b >> 16, dt), _half(c >> 16, dt), _half(d >> 16, dt))


@triton.jit
def _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total, m_left, stride_xm, K,
                    shape: tl.constexpr, XTB: tl.constexpr):
    """The asm's activation operands for chunk kt, broadcast to ``shape``: the chunk's x
    address (its permuted block when XTB > 0), M - 1, the x row stride in bytes, the K left."""
    if XTB > 0:
        xa = tl.zeros(shape, tl.int64) + (
            x_ptr + (pid_m * kt_total + kt) * (128 * XTB)).to(tl.int64)
    else:
        xa = tl.zeros(shape, tl.int64) + (x_rows + kt * 128).to(tl.int64)
    mm1 = tl.zeros(shape, tl.int32) + (m_left - 1)
    stride_b = tl.zeros(shape, tl.int32) + stride_xm * 2
    krem = tl.zeros(shape, tl.int32) + (K - kt * 128)
    return xa, mm1, stride_b, krem


@triton.jit
def _mma_asm_chunk(acc, q, s16, z16, kt, x_ptr, x_rows, pid_m, kt_total, m_left, stride_xm, K,
                   BN: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                   ROWS: tl.constexpr, FS: tl.constexpr, XTB: tl.constexpr,
                   HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    """One chunk of the MMA path's asm (one group per chunk): s16 / z16 are the rows' scale
    and zterm ([BN, 1], activation dtype; z16 unused without zero points)."""
    shape: tl.constexpr = (BN, 16)
    xa, mm1, stride_b, krem = _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total, m_left,
                                              stride_xm, K, shape, XTB)
    if FS > 0:
        s32 = s16.to(tl.float32)
        if HAS_ZERO:
            z32 = z16.to(tl.float32)
        else:
            z32 = -8.0 * s32
        if FS == 2:
            if IS_BF16:
                ce32 = z32 - 128.0 * s32
                co32 = ce32
            else:
                ce32 = z32 - 1024.0 * s32
                co32 = z32 - 64.0 * s32
        else:
            ce32 = z32 + 8.0 * s32
            co32 = ce32
        return tl.inline_asm_elementwise(
            ASM, CONSTRAINTS,
            [q, tl.broadcast_to(s32, shape), tl.broadcast_to(ce32, shape),
             tl.broadcast_to(co32, shape), acc, xa, mm1, stride_b, krem],
            dtype=tl.float32, is_pure=True, pack=4 * ROWS)
    sa = tl.broadcast_to(s16, shape)
    if HAS_ZERO:
        za = tl.broadcast_to(z16, shape)
    else:
        za = sa
    return tl.inline_asm_elementwise(
        ASM, CONSTRAINTS, [q, sa, sa, sa, sa, za, za, za, za, acc, xa, mm1, stride_b, krem],
        dtype=tl.float32, is_pure=True, pack=4 * ROWS)


@triton.jit
def _mma_token(c):
    """Token of accumulator column c (see :func:`mma_asm`): 2 (c // 4) + c % 2 + 8 (c // 2 % 2)."""
    return 2 * (c // 4) + (c % 2) + 8 * ((c // 2) % 2)


@triton.jit
def w4a16_mma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr = False,
    IS_BF16: tl.constexpr = False, PREFETCH: tl.constexpr = False, ASM: tl.constexpr = "",
    CONSTRAINTS: tl.constexpr = "", DOT_F32: tl.constexpr = False, ROWS: tl.constexpr = 2,
    XTB: tl.constexpr = 0, PIPE: tl.constexpr = None, FS: tl.constexpr = 0,
    QC: tl.constexpr = "", QE: tl.constexpr = "", SV: tl.constexpr = 1,
    PAIRS: tl.constexpr = False,
):
    """Small-M path (M = 2..16 tokens per program): every packed word is dequantized once and
    multiplied with all the tokens on the tensor cores (``mma.sync`` m16n8k16 in inline asm,
    :func:`mma_asm`), with the dequantized weights and the activations going straight from
    global memory into the MMA's register fragments: no shared memory, no barrier.

    Grid (token blocks of 16, SPLIT_K, row blocks of BN = 8 ROWS num_warps: ROWS = 2 or 4 rows
    per thread, all in one asm call, which share the activation loads). The accumulator is a
    [BN, 16] float32 tile in the word tile's layout; column c holds token
    :func:`_mma_token` (c). Without USE_ASM (the interpreter) the same product runs as eight
    ``tl.dot`` per chunk on the same dequantized planes.

    XTB > 0: x is the per-call permuted copy of :func:`permute_x` with token blocks of XTB
    (8 or 16) zero-padded tokens, 128 XTB halves per chunk and block.

    Load options (NOTES.md, v8-v10): PIPE = S puts the word loads through the software
    pipeliner (cp.async, S - 1 chunks ahead); QC / QE are the word loads' cache modifier and
    eviction policy (the H100 table uses evict_first: the words pass through L1 once); SV = 2 or
    4 takes SV chunks per step and loads each row's SV scales and zterms with one 4- or 8-byte
    load (block 128 only, checked by the launcher); FS = 1 / 2 applies the scales in float32
    after the MMAs (:func:`mma_fs_asm`, block >= 128). PAIRS (with SV > 1 and zero points):
    s_ptr holds :func:`~.packing.pair_scales`, and one 8- or 16-byte load per row brings the SV
    chunks' scales and zterms together.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    m0 = pid_m * 16
    m_left = tl.minimum(M - m0, 16)
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
    s_rows = s_ptr + rn_safe[:, None] * n_groups
    z_rows = z_ptr + rn_safe[:, None] * n_groups
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    tok = _mma_token(rj)                                     # token of accumulator column
    x_rows = x_ptr + m0 * stride_xm
    shape: tl.constexpr = (BN, 16)

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    if SV > 1:  # SV chunks per step: their words, then one SV-wide load of scales and zterms
        # (block 128, SV | K slice, SV | groups per row: the launcher checks)
        for kt2 in range(kt0, kt1, SV):
            qa = tl.load(q_ptrs + kt2 * 16, cache_modifier=QC, eviction_policy=QE)
            qb = tl.load(q_ptrs + (kt2 + 1) * 16, cache_modifier=QC, eviction_policy=QE)
            if SV == 4:
                qc = tl.load(q_ptrs + (kt2 + 2) * 16, cache_modifier=QC, eviction_policy=QE)
                qd = tl.load(q_ptrs + (kt2 + 3) * 16, cache_modifier=QC, eviction_policy=QE)
            if PAIRS:
                s0, s1, s2, s3, z0, z1, z2, z3 = _load_pairs(s_rows + kt2, SV,
                                                             x_ptr.dtype.element_ty)
            else:
                s0, s1, s2, s3 = _load_halves(s_rows + kt2, SV)
                if HAS_ZERO:
                    z0, z1, z2, z3 = _load_halves(z_rows + kt2, SV)
                else:
                    z0, z1, z2, z3 = s0, s1, s2, s3
            acc = _mma_asm_chunk(acc, qa, s0, z0, kt2, x_ptr, x_rows, pid_m, kt_total, m_left,
                                 stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB, HAS_ZERO,
                                 IS_BF16)
            acc = _mma_asm_chunk(acc, qb, s1, z1, kt2 + 1, x_ptr, x_rows, pid_m, kt_total,
                                 m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                 HAS_ZERO, IS_BF16)
            if SV == 4:
                acc = _mma_asm_chunk(acc, qc, s2, z2, kt2 + 2, x_ptr, x_rows, pid_m, kt_total,
                                     m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                     HAS_ZERO, IS_BF16)
                acc = _mma_asm_chunk(acc, qd, s3, z3, kt2 + 3, x_ptr, x_rows, pid_m, kt_total,
                                     m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                     HAS_ZERO, IS_BF16)
        kt1 = kt0   # done: the general loop below runs no iteration
    if not PAIRS:  # (PAIRS comes with SV > 1: the loop above did every chunk)
        if PREFETCH:
            q_next = tl.load(q_ptrs + kt0 * 16, mask=kt0 < kt1, other=0, cache_modifier=QC,
                             eviction_policy=QE)
        for kt in tl.range(kt0, kt1, num_stages=PIPE):
            if PREFETCH:
                q = q_next
                q_next = tl.load(q_ptrs + (kt + 1) * 16, mask=kt + 1 < kt1, other=0,
                                 cache_modifier=QC, eviction_policy=QE)
            else:
                q = tl.load(q_ptrs + kt * 16, cache_modifier=QC, eviction_policy=QE)
            g0 = kt * GPC if GROUP < 128 else (kt * 128) // GROUP
            if USE_ASM and FS > 0:  # one group per chunk; scales applied in float32 (mma_fs_asm)
                gs = g0
                if not EVEN_K:
                    gs = tl.minimum(gs, n_groups - 1)
                s16 = _load_half_raw(s_rows + gs, USE_ASM)
                z16 = s16
                if HAS_ZERO:
                    z16 = _load_half_raw(z_rows + gs, USE_ASM)
                acc = _mma_asm_chunk(acc, q, s16, z16, kt, x_ptr, x_rows, pid_m, kt_total, m_left,
                                     stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB, HAS_ZERO,
                                     IS_BF16)
            elif USE_ASM:
                sa, za = _mma_scales(s_rows, z_rows, g0, n_groups, shape, HAS_ZERO, EVEN_K, USE_ASM)
                sb, zb = sa, za
                sc, zc = sa, za
                sd, zd = sa, za
                if GPC >= 2:
                    sb, zb = _mma_scales(s_rows, z_rows, g0 + 1, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                if GPC == 4:
                    sc, zc = _mma_scales(s_rows, z_rows, g0 + 2, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                    sd, zd = _mma_scales(s_rows, z_rows, g0 + 3, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                xa, mm1, stride_b, krem = _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total,
                                                          m_left, stride_xm, K, shape, XTB)
                acc = tl.inline_asm_elementwise(
                    ASM, CONSTRAINTS,
                    [q, sa, sb, sc, sd, za, zb, zc, zd, acc, xa, mm1, stride_b, krem],
                    dtype=tl.float32, is_pure=True, pack=4 * ROWS)
            else:
                if XTB > 0:  # k 16 i + 4 t + e of load j = i // 2 at [j, token, t, i % 2, e]
                    tmask = (tok < XTB)[None, :]
                    x_ptrs = (x_ptr + (pid_m * kt_total + kt) * (128 * XTB) + tok[None, :] * 32
                              + (rj // 4)[:, None] * 8 + (rj % 4)[:, None])
                else:
                    x_ptrs = x_rows + tok[None, :] * stride_xm + rj[:, None]  # [16 k, 16 tokens]
                    tmask = (tok < m_left)[None, :]
                for b in tl.static_range(4):
                    if (b * 32) % (128 // GPC) == 0:
                        s, z = _chunk_scale_zero(s_ptr + rn_safe * n_groups,
                                                 z_ptr + rn_safe * n_groups, kt, b, n_groups, GPC,
                                                 GROUP, EVEN_K, HAS_ZERO)
                    lo, hi = _dequant_byte(q, s, z, b, False, HAS_ZERO, IS_BF16)
                    for h in tl.static_range(2):
                        kk = kt * 128 + 32 * b + 16 * h
                        if XTB > 0:
                            xt = tl.load(x_ptrs + (b * 32 * XTB + 4 * h), mask=tmask, other=0.0)
                        else:
                            xt = tl.load(x_ptrs + kk, mask=tmask & ((kk + rj) < K)[:, None],
                                         other=0.0)
                        w = lo if h == 0 else hi
                        if DOT_F32:
                            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
                        else:
                            acc = tl.dot(w, xt, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_safe).to(tl.float32)[:, None] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + (m0 + tok)[None, :] * stride_om + rn[:, None]
    omask = (rn[:, None] < N) & (tok < m_left)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
