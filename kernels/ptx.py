"""Inline PTX of the W4A16 CUDA-core GEMV and small-M MMA kernels, built as text.

Pure Python (no Triton import): :func:`gemv_asm` / :func:`xprep_asm` give the GEMV's per-word
dot product and per-chunk activation preparation (``gemv.py``), :func:`mma_asm` /
:func:`mma_fs_asm` one chunk of the MMA path, dequantization into ``mma.sync`` fragments
included, with the register constraints of :func:`mma_constraints` / :func:`mma_fs_constraints`
(``mma.py``).
"""


def gemv_asm(bf16: bool, groups_per_chunk: int) -> str:
    """One packed word dotted with its 8 activations: (u - 8) * x summed in half precision.

    Inputs (after the 2 or 4 outputs): the word, then four f16x2 (bf16x2) pairs
    xp_b = (x[16b + j], x[16(b+4) + j]), b = 0..3. The mask 0x000F000F OR-ed with the
    half-precision 1024 (bf16: 128) gives (1024 + u_b, 1024 + u_b+4); subtracting 1032 (136)
    leaves (u - 8) exactly, centred so the half-precision products stay small. fp16 reads
    planes 1 and 3 in place (mask 0x00F000F0: 1024 + 16 u, minus 1152 = 16 (u - 8), against
    activations pre-divided by 16; exact), so one shift per word serves all eight planes;
    bf16 (7 mantissa bits) shifts per plane pair.
    Outputs, float32: one sum per group of the chunk: planes 0-3 and 4-7 (1 or 2 groups per
    chunk), or planes 0-1, 2-3, 4-5, 6-7 (block 32).
    """
    ty = "bf16x2" if bf16 else "f16x2"
    cvt = "cvt.f32.bf16" if bf16 else "cvt.f32.f16"
    n_out = 4 if groups_per_chunk == 4 else 2
    q = f"${n_out}"
    lines = ["mov.b32 m, " + ("0x43004300;" if bf16 else "0x64006400;"),
             "mov.b32 o, " + ("0x43084308;" if bf16 else "0x64086408;")]
    if not bf16:
        lines.append("mov.b32 o16, 0x64806480;")
    for b in range(4):
        acc = "a" if (n_out == 2 or b < 2) else "c"
        xp = f"${n_out + 1 + b}"
        if bf16:
            src = q if b == 0 else "w"
            if b:
                lines.append(f"shr.u32 w, {q}, {4 * b};")
            lines.append(f"lop3.b32 t, {src}, 0x000F000F, m, 0xEA;")
            lines.append(f"sub.rn.{ty} t, t, o;")
        else:
            src = q if b < 2 else "w"
            if b == 2:
                lines.append(f"shr.u32 w, {q}, 8;")
            mask, off = ("0x000F000F", "o") if b % 2 == 0 else ("0x00F000F0", "o16")
            lines.append(f"lop3.b32 t, {src}, {mask}, m, 0xEA;")
            lines.append(f"sub.rn.{ty} t, t, {off};")
        first = b == 0 or (n_out == 4 and b == 2)
        lines.append(f"mul.rn.{ty} {acc}, t, {xp};" if first else
                     f"fma.rn.{ty} {acc}, t, {xp}, {acc};")
    lines += ["mov.b32 {lo, hi}, a;", f"{cvt} $0, lo;"]
    if n_out == 2:
        lines.append(f"{cvt} $1, hi;")
    else:  # a: planes (0,1 | 4,5), c: planes (2,3 | 6,7)
        lines += [f"{cvt} $2, hi;", "mov.b32 {lo, hi}, c;", f"{cvt} $1, lo;", f"{cvt} $3, hi;"]
    body = "\n".join(lines)
    return f"""
{{
.reg .b32 m, o, o16, t, w, a, c;
.reg .b16 lo, hi;
{body}
}}
"""


def xprep_asm(bf16: bool, groups_per_chunk: int) -> str:
    """Eight activations x[16i + j], i = 0..7 (as 16-bit integers $n_out..), into the four
    pairs the GEMV asm reads (fp16: pairs 1 and 3 divided by 16, exact) and the float32 sum
    of x per group of the chunk (same order as :func:`_gemv_asm`'s outputs)."""
    ty = "bf16x2" if bf16 else "f16x2"
    n_s = 4 if groups_per_chunk == 4 else 2
    x = [f"${4 + n_s + i}" for i in range(8)]
    lines = []
    for b in range(4):
        if bf16 or b % 2 == 0:
            lines.append(f"mov.b32 ${b}, {{{x[b]}, {x[b + 4]}}};")
        else:
            lines.append(f"mov.b32 p{b}, {{{x[b]}, {x[b + 4]}}};")
            lines.append(f"mul.rn.{ty} ${b}, p{b}, d;")
    if bf16:  # bf16 sums in float32 (bf16 -> f32 is exact)
        lines += [f"cvt.f32.bf16 f{i}, {x[i]};" for i in range(8)]
        if n_s == 2:
            lines += ["add.f32 f0, f0, f1;", "add.f32 f2, f2, f3;", "add.f32 $4, f0, f2;",
                      "add.f32 f4, f4, f5;", "add.f32 f6, f6, f7;", "add.f32 $5, f4, f6;"]
        else:
            lines += ["add.f32 $4, f0, f1;", "add.f32 $5, f2, f3;", "add.f32 $6, f4, f5;",
                      "add.f32 $7, f6, f7;"]
    else:  # fp16 sums of 2 or 4 values in f16x2, then float32
        lines += [f"mov.b32 p0, {{{x[0]}, {x[4]}}};", f"mov.b32 p2, {{{x[2]}, {x[6]}}};",
                  "add.rn.f16x2 s, p0, p1;", "add.rn.f16x2 r, p2, p3;"]
        if n_s == 2:
            lines += ["add.rn.f16x2 s, s, r;", "mov.b32 {lo, hi}, s;", "cvt.f32.f16 $4, lo;",
                      "cvt.f32.f16 $5, hi;"]
        else:
            lines += ["mov.b32 {lo, hi}, s;", "cvt.f32.f16 $4, lo;", "cvt.f32.f16 $6, hi;",
                      "mov.b32 {lo, hi}, r;", "cvt.f32.f16 $5, lo;", "cvt.f32.f16 $7, hi;"]
    body = "\n".join(lines)
    return f"""
{{
.reg .b32 p0, p1, p2, p3, s, r, d;
.reg .f32 f0, f1, f2, f3, f4, f5, f6, f7;
.reg .b16 lo, hi;
mov.b32 d, 0x2C002C00;
{body}
}}
"""


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


def _prmt_ptx(b: int, rows: int, q: list[str], swapped: bool = False,
              partner: bool = False) -> list[str]:
    """PTX: byte b of each A fragment's word pair into the halves of p{pair}_{fragment}
    (``swapped``: the tiled layout's pairs, ``packing.swap_pair_bytes``, where it is byte
    b mod 2 of word b // 2 and two bytes up: one PRMT of that word, as many instructions as
    the row-by-row words take). ``partner``: the pair's other word as the PRMT's second
    operand, which the selector never reads; it keeps both words in use until byte 3 as the
    row-by-row gather does, and with it ptxas's register allocation (2 warps, 4 rows a thread,
    SV 4, up to 8 tokens: 128 instead of 132 registers, 8 programs per SM instead of 7)."""
    if swapped:
        sel = "0x3311" if b % 2 else "0x2200"
        other = (1 - b // 2) if partner else b // 2
        return [f"prmt.b32 p{pr}_{f}, {q[4 * (2 * pr + slot) + w + b // 2]}, "
                f"{q[4 * (2 * pr + slot) + w + other]}, {sel};"
                for pr in range(rows // 2) for f, (slot, w) in enumerate(_FRAG_SRC)]
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
            rows: int = 2, xperm: bool = False, swapped: bool = False,
            partner: bool = False) -> str:
    """One chunk (128 k) of the small-M tensor-core GEMV for one thread: ``rows`` rows x 4 words.

    Thread layout (the [BN, 16] int32 tile's blocked layout: 4 consecutive words of a row
    per thread, 8 x 4 threads per warp, BN = 8 rows num_warps): lane = 4 g + t holds words
    4t .. 4t+3 of its rows (slots 0 .. rows-1). That is the A-fragment layout of
    ``mma.m16n8k16`` with mma rows (g, g + 8) = slots (2p, 2p + 1) and, for nibble plane i,
    mma k (2t, 2t+1) = words (4t, 4t+1) and k (2t+8, 2t+9) = words (4t+2, 4t+3): K is a
    sum, so any fixed permutation of it works when the activations follow it. One PRMT per
    word pair and byte puts byte b of both words in the two halves of a register (``swapped``,
    the tiled layout's byte-swapped pairs: a PRMT of one word, ``partner`` as in
    :func:`_prmt_ptx`); LOP3 with
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
        lines += _prmt_ptx(b, rows, q, swapped, partner)
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
               xperm: bool = False, fold: bool = False, swapped: bool = False,
               partner: bool = False) -> str:
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
        lines += _prmt_ptx(b, rows, q, swapped, partner)
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
