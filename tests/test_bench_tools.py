"""The kernel benchmarks' table writer (benchmarks/kernels/ab.py --write-table): which row of a
config table an adopted config lands in."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernels"))
ab = pytest.importorskip("ab")


def _table(tmp_path):
    path = tmp_path / "t.json"
    rows = [dict(max_m=m, config=dict(BM=m), us=1.0) for m in (1, 16, 64, 256, 1 << 30)]
    path.write_text(json.dumps({"4096x8192": rows}))
    return path


def _rows(path):
    return [(r["max_m"], r["config"]) for r in json.loads(path.read_text())["4096x8192"]]


def test_put_row_replaces_inserts_and_keeps_order(tmp_path):
    path = _table(tmp_path)
    assert ab.put_row(path, "4096x8192", 64, dict(WS=True), 2.0) == "row max_m 64 replaced"
    assert ab.put_row(path, "4096x8192", 384, dict(S=1), 3.0) == "row max_m 384 inserted"
    assert ab.put_row(path, "4096x8192", 128, dict(S=2), 3.0) == "row max_m 128 inserted"
    got = _rows(path)
    assert [m for m, _ in got] == [1, 16, 64, 128, 256, 384, 1 << 30]
    assert got[2][1] == dict(WS=True) and got[5][1] == dict(S=1)
    assert got[-1][1] == dict(BM=1 << 30)          # the open-ended row is untouched below 1024


def test_put_row_m1024_takes_the_open_ended_row(tmp_path):
    path = _table(tmp_path)
    assert ab.put_row(path, "4096x8192", 1024, dict(P=1), 5.0) == "row max_m 1073741824 replaced"
    assert _rows(path)[-1] == (1 << 30, dict(P=1)) and len(_rows(path)) == 5


def test_put_row_unknown_shape_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no row for 8192x4096"):
        ab.put_row(_table(tmp_path), "8192x4096", 64, {}, 1.0)


def test_ceiling_variants_replace_only_the_byte_gather():
    """ceiling.py's timing variants: ``prmt`` is the row-by-row words' asm (what tiled words
    ran before their pairs were byte-swapped), ``noprmt`` the swapped words' shipped asm, and
    both keep the rest of the dequantization."""
    ceiling = pytest.importorskip("ceiling")
    from modelopt_lite.kernels.dequant import _asm

    for bf16 in (False, True):
        prmt = ceiling.variant_asm("prmt", bf16, True, False, False, True)
        assert prmt == tuple(_asm(bf16, True, b) for b in range(4))
        noprmt = ceiling.variant_asm("noprmt", bf16, True)
        shipped = tuple(_asm(bf16, True, b, swapped=True) for b in range(4))
        assert [a.replace("shr.b32", "shr.u32") for a in noprmt] == list(shipped)
        assert ceiling.variant_asm("moves", bf16, True) == (ceiling.MOVES,) * 4
