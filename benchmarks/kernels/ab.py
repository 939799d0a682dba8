"""Interleaved A/B of kernel configs on one (shape, M), in one process: each config (the shipped
dispatch, its --twin variants, optionally Humming) is captured once as a CUDA graph over
rotating weight copies, then the configs take turns for --rounds rounds (each round: a short
warm replay, then the median of --reps timed replays per config). Sequential sweeps read
differences of 1-4 % that flip between processes (NOTES.md, v35); alternating the arms
within one process makes clock and neighbour drift hit every arm alike. Prints, per config,
the median over rounds and the rounds in which it beat the shipped dispatch.

    python benchmarks/kernels/ab.py --shape 8192x28672 --m 1 \\
        --twin WS=true,BN=128,BM=16,OUT16=true,COAL=true,TILED=true,STAGES=4,STREAM=2 --humming
    python benchmarks/kernels/ab.py --shape 28672x8192 --m 2 --twin SPLIT_K=4 \\
        --write-table kernels/configs/h100.json          # adopt: > 3 % in 8 of 9 rounds
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, problems  # noqa: E402
from sweep_large import parse_twin  # noqa: E402
from sweep_v5 import shipped  # noqa: E402
import peers  # noqa: E402
from common import capture, import_kernels, replay_median_us  # noqa: E402


def time_graph(graph, n_calls, reps, warm_ms):
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warm_ms:
        graph.replay()
        torch.cuda.synchronize()
    return replay_median_us(graph, n_calls, reps)


def adopt(a, k, n, m, rows):
    """``--write-table``: the fastest candidate arm that clears the margin in (nearly) every
    round becomes the table's row for M (:func:`put_row`)."""
    ship = next(r for r in rows if r["arm"] == "shipped")["median_us"]
    need = a.rounds - 1 if a.min_wins is None else a.min_wins
    ok = [r for r in rows if r["arm"].startswith(("twin", "cfg"))
          and r["median_us"] < (1 - a.margin) * ship and r["beats_shipped"] >= need]
    if not ok:
        print(f"no arm clears {a.margin:.0%} in {need} of {a.rounds} rounds: table unchanged")
        return
    best = min(ok, key=lambda r: r["median_us"])
    what = put_row(a.write_table, f"{n}x{k}", m, best["cfg"], best["median_us"])
    print(f"{best['arm']} written to {a.write_table} ({what}): {ship} -> {best['median_us']} us")


def put_row(path, key, m, cfg, us):
    """Row ``max_m = m`` of table ``key`` (N x K) takes ``cfg``: replaced where it exists, else
    inserted in order, so that it serves the M between the row below and m; M >= 1024 replaces
    the open-ended last row. Returns what was done."""
    table = json.loads(Path(path).read_text())
    if key not in table:
        raise SystemExit(f"{path} has no row for {key} (N x K): add the shape first")
    rows = table[key]
    row = next((r for r in rows if r["max_m"] == m), None)
    if row is None and m >= 1024 and rows and rows[-1]["max_m"] >= 1 << 30:
        row = rows[-1]
    if row is not None:
        row.update(config=cfg, us=us)
        what = f"row max_m {row['max_m']} replaced"
    else:
        rows.append(dict(max_m=m, config=cfg, us=us))
        rows.sort(key=lambda r: r["max_m"])
        what = f"row max_m {m} inserted"
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    return what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="KxN")
    ap.add_argument("--m", type=int, required=True)
    ap.add_argument("--twin", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="the shipped config with these settings (repeatable)")
    ap.add_argument("--cfg", action="append", default=[], metavar="JSON",
                    help="a whole config (repeatable)")
    ap.add_argument("--humming", action="store_true", help="Humming as one more arm")
    ap.add_argument("--zeros-arm", action="store_true",
                    help="one more arm: the shipped config after a torch.zeros of the output's "
                         "size (what one more small graph node costs)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warm-ms", type=float, default=30.0)
    ap.add_argument("--pdl-off-arm", action="store_true",
                    help="one more arm: the shipped config with MODELOPT_LITE_PDL=0 (split-K "
                         "outputs zeroed by torch.zeros, no programmatic dependent launch)")
    ap.add_argument("--int-zero", action="store_true",
                    help="integer zero points (as Humming's): the WS kernel reads 4-bit zeros")
    ap.add_argument("--symmetric", action="store_true",
                    help="symmetric weights (no zero points; the Humming arm keeps its own)")
    ap.add_argument("--pairs-arm", action="store_true",
                    help="one more arm: the shipped config reading the scale / zero-term pairs "
                         "(MODELOPT_LITE_WS_SCALES=pairs)")
    ap.add_argument("--rows-arm", action="store_true",
                    help="the shipped config on the words packed row by row (the arms read "
                         "them tile by tile, as deploy stores them)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-table", default=None, metavar="JSON",
                    help="put the fastest twin / cfg arm into this config table (row max_m = "
                         "M, inserted if missing) where its median is more than --margin below the shipped "
                         "arm's and it beat the shipped arm in at least --min-wins rounds")
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--min-wins", type=int, default=None, help="default: all rounds but one")
    a = ap.parse_args()
    mk = import_kernels()
    env_pdl = importlib.import_module(mk.__name__ + ".pdl").ENV_PDL
    k, n = (int(v) for v in a.shape.split("x"))
    _, _, m, w16, packed, nc, _, x, ref = next(problems(mk, [(k, n)], [a.m], a.int_zero,
                                                             a.symmetric))
    env_scales = importlib.import_module(mk.__name__ + ".ops").ENV_WS_SCALES
    base = shipped(mk, m, n, k)
    arms = [("shipped", base)] + [(f"twin{i}", {**base, **parse_twin(t)})
                                  for i, t in enumerate(a.twin)]
    arms += [(f"cfg{i}", json.loads(c)) for i, c in enumerate(a.cfg)]
    graphs = {}
    for name, cfg in arms:
        fns = ours_fns(mk, packed, x, nc, cfg)
        try:
            out = fns[0]()
        except ValueError as e:     # a config the kernel refuses (e.g. a ring too deep)
            if name == "shipped":
                raise
            print(f"{name}: skipped, {e}", flush=True)
            continue
        err = peers.check(out, ref)
        if not err <= 3e-3:   # NaN too
            raise SystemExit(f"{name} {cfg}: error {err:.2e} against the fp32 product")
        graphs[name] = (capture(fns), fns, cfg, err)  # fns keep the graph's tensors alive
    if a.pdl_off_arm:
        os.environ[env_pdl] = "0"   # read when each call zeroes its output: at capture
        fns = ours_fns(mk, packed, x, nc, base)
        graphs["pdl_off"] = (capture(fns), fns, None, None)
        del os.environ[env_pdl]
    if a.pairs_arm:
        os.environ[env_scales] = "pairs"   # read at each call: at capture
        fns = ours_fns(mk, packed, x, nc, base)
        graphs["pairs"] = (capture(fns), fns, None, None)
        del os.environ[env_scales]
    if a.zeros_arm:
        fns = ours_fns(mk, packed, x, nc, base)
        fns = [lambda f=f: (torch.zeros((m, n), device="cuda", dtype=x.dtype), f())[1]
               for f in fns]
        graphs["zeros"] = (capture(fns), fns, None, None)
    if a.rows_arm:   # the words row by row (TILED configs: a cached tile-by-tile copy)
        flat = packed._replace(qweight=packed.row_words(), tile_rows=0)
        fns = ours_fns(mk, flat, x, nc, base)
        graphs["rows"] = (capture(fns), fns, None, peers.check(fns[0](), ref))
    if a.humming:
        fns = peers.humming(w16, 128, x, nc)
        graphs["humming"] = (capture(fns), fns, None, None)
    times = {name: [] for name in graphs}
    for r in range(a.rounds):
        order = list(graphs) if r % 2 == 0 else list(reversed(graphs))
        for name in order:
            g, fns, _, _ = graphs[name]
            times[name].append(time_graph(g, len(fns), a.reps, a.warm_ms))
    rows = []
    for name, (_, _, cfg, err) in graphs.items():
        wins = sum(t < s for t, s in zip(times[name], times["shipped"]))
        row = {"arm": name, "median_us": round(statistics.median(times[name]), 2),
               "rounds_us": [round(t, 2) for t in times[name]], "beats_shipped": wins,
               "cfg": cfg, "err": err}
        rows.append(row)
        print(f"{name:>8} {row['median_us']:8.2f} us  beats shipped in {wins}/{a.rounds}  "
              f"{json.dumps(cfg) if cfg and name != 'shipped' else ''}", flush=True)
    if a.write_table:
        adopt(a, k, n, m, rows)
    if a.out:
        Path(a.out).write_text(json.dumps(
            {"K": k, "N": n, "M": m, "zeros": "none" if a.symmetric else "integer" if a.int_zero else "float",
             "gpu": torch.cuda.get_device_name(),
             "date": datetime.date.today().isoformat(), "rounds": a.rounds, "reps": a.reps,
             "arms": rows}, indent=1))


if __name__ == "__main__":
    main()
