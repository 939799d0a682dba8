import pytest
import torch
from hypothesis import given, settings, strategies as st

from modelopt_lite.kernels import dequantize, pack_int4, pack_weight, unpack_int4
from modelopt_lite.kernels.packing import padded_k, quantize_rtn


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 9), kw=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(n, kw, seed):
    g = torch.Generator().manual_seed(seed)
    k = kw * 8
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (n, padded_k(k) // 8)
    assert torch.equal(unpack_int4(packed, k), codes)


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=16))
def test_unpack_pack_roundtrip_every_word(words):
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    packed = torch.tensor([signed], dtype=torch.int32)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_nibble_plane_i_is_a_16_wide_k_slice():
    codes = (torch.arange(128) // 16).to(torch.uint8).view(1, 128)  # code = plane index
    words = pack_int4(codes)[0].tolist()
    assert len(words) == 16
    assert all(w & 0xFFFFFFFF == 0x76543210 for w in words)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_pack_weight_dequantizes_to_codes_minus_zero_times_scale(symmetric, group):
    n, k = 5, 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // group) * 0.1 + 0.01
    zero = None if symmetric else torch.rand(n, k // group) * 15
    p = pack_weight(codes, scale, zero, group, torch.float16)
    z = torch.full_like(scale, 8.0) if zero is None else zero
    expect = (codes.float() - z.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    err = (dequantize(p) - expect).norm() / expect.norm()
    assert err < 2e-3


def test_rtn_asymmetric_reproduces_a_min_max_grid_exactly():
    n, k, group = 4, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    codes[:, ::group] = 0
    codes[:, 1::group] = 15
    scale, lo = torch.rand(n, k // group) + 0.5, torch.randn(n, k // group)
    w = codes.float() * scale.repeat_interleave(group, 1) + lo.repeat_interleave(group, 1)
    c2, s2, z2 = quantize_rtn(w, group)
    assert torch.equal(c2, codes)
    w2 = (c2.float() - z2.repeat_interleave(group, 1)) * s2.repeat_interleave(group, 1)
    assert torch.allclose(w2, w, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K % 8"):
        pack_int4(torch.zeros(1, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="block size"):
        pack_weight(torch.zeros(2, 96, dtype=torch.uint8), torch.ones(2, 1), None, 64)


def test_unpack_in_features_zero_and_out_of_range():
    packed = pack_int4(torch.randint(0, 16, (3, 128), dtype=torch.uint8))
    assert unpack_int4(packed, 0).shape == (3, 0)       # 0 is a width, not "not given"
    assert unpack_int4(packed).shape == (3, 128)
    with pytest.raises(ValueError, match=r"in_features must be in \[0, 128\]"):
        unpack_int4(packed, 129)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), chunks=st.integers(1, 4), rows=st.sampled_from([128, 256, 384]),
       seed=st.integers(0, 2**31 - 1))
def test_tiled_words_roundtrip_and_layout(n, chunks, rows, seed):
    """tile_words puts word j of chunk c of row r0 + r (r0 its row block's first row, nb that
    block's rows, the last block partial) at flat index r0 Kp/8 + 16 (c nb + r) + j, each pair
    (2i, 2i + 1) byte-swapped: the first holds the low 16 bits of both words, the second the
    high 16 bits; untile_words inverts it."""
    from modelopt_lite.kernels.packing import tile_words, untile_words

    g = torch.Generator().manual_seed(seed)
    kw = 16 * chunks
    q = torch.randint(-2**31, 2**31 - 1, (n, kw), generator=g, dtype=torch.int32)
    t = tile_words(q, rows)
    assert t.shape == q.shape and torch.equal(untile_words(t, rows), q)
    flat = t.view(-1)
    for row in {0, n - 1, n // 2, min(rows, n - 1)}:
        r0 = row // rows * rows
        nb = min(rows, n - r0)
        for c in range(chunks):
            idx = r0 * kw + 16 * (c * nb + row - r0) + torch.arange(16)
            got = [int(v) & 0xFFFFFFFF for v in flat[idx]]
            words = [int(v) & 0xFFFFFFFF for v in q[row, 16 * c:16 * c + 16]]
            for i in range(8):
                w0, w1 = words[2 * i], words[2 * i + 1]
                assert got[2 * i] == (w0 & 0xFFFF) | (w1 & 0xFFFF) << 16
                assert got[2 * i + 1] == w0 >> 16 | (w1 >> 16) << 16


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), src=st.sampled_from([0, 128, 256]),
       dst=st.sampled_from([0, 128, 256, 384]), seed=st.integers(0, 2**31 - 1))
def test_relayout_words_between_any_two_layouts(n, src, dst, seed):
    """relayout_words(q, src, dst) equals tiling the row-by-row words in blocks of dst (0: row
    by row) whatever layout q is in; PackedInt4.tiled / row_words go through it."""
    from modelopt_lite.kernels import pack_weight
    from modelopt_lite.kernels.packing import relayout_words, tile_words

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2**31, 2**31 - 1, (n, 32), generator=g, dtype=torch.int32)
    q_src = tile_words(q, src) if src else q
    want = tile_words(q, dst) if dst else q
    out = relayout_words(q_src, src, dst)
    assert torch.equal(out, want)
    assert (out is q_src) == (src == dst)
    codes = torch.randint(0, 16, (n, 256), generator=g, dtype=torch.uint8)
    p = pack_weight(codes, torch.rand(n, 2) + 0.1, None, 128)
    ps = p.tiled(src)
    assert ps.tile_rows == src and torch.equal(ps.tiled(dst).qweight, p.tiled(dst).qweight)
    assert torch.equal(ps.row_words(), p.qweight) and ps.tiled(0).tile_rows == 0


def test_tiled_words_bad_inputs():
    from modelopt_lite.kernels.packing import tile_words

    q = torch.zeros(4, 32, dtype=torch.int32)
    for rows in (0, 100, True, 64):
        with pytest.raises(ValueError, match="multiple of 128"):
            tile_words(q, rows)
    with pytest.raises(ValueError, match="multiple of 16"):
        tile_words(torch.zeros(4, 24, dtype=torch.int32), 128)


def test_swap_pair_bytes_is_its_own_inverse_and_keeps_byte_planes():
    """Byte b of the pair (w0, w1) is byte b mod 2 of word b // 2 after the swap (the copy of
    w1 two bytes above it), so nibble plane pairs stay whole."""
    from modelopt_lite.kernels.packing import swap_pair_bytes

    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2**31, 2**31 - 1, (7, 48), generator=g, dtype=torch.int32)
    s = swap_pair_bytes(q)
    assert s.dtype == torch.int32 and torch.equal(swap_pair_bytes(s), q)
    u = lambda t: t.to(torch.int64) & 0xFFFFFFFF   # noqa: E731
    for b in range(4):
        src = u(s[:, 0::2] if b < 2 else s[:, 1::2]) >> (8 * (b % 2))
        assert torch.equal(src & 0xFF, (u(q[:, 0::2]) >> 8 * b) & 0xFF)
        assert torch.equal((src >> 16) & 0xFF, (u(q[:, 1::2]) >> 8 * b) & 0xFF)
    with pytest.raises(ValueError, match="even"):
        swap_pair_bytes(q[:, :3])
