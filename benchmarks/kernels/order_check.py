"""Why is our M = 1 time on the large shapes higher in the full table than in sweeps? Runs the
table's code path (bench_w4a16.bench) for 8192x28672, M = 1 in one process: fresh, after the
peers have been built and run, and after a large-M row with every peer."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import bench  # noqa: E402
from common import copy_bandwidth, import_kernels  # noqa: E402

mk = import_kernels()
gpu = torch.cuda.get_device_name()
bw = copy_bandwidth()
ALL = {"cublas", "tinygemm", "gemlite", "humming"}
steps = [("fresh", [(8192, 28672)], [1], set()),
         ("fresh again", [(8192, 28672)], [1], set()),
         ("with peers (ours first)", [(8192, 28672)], [1], ALL),
         ("after peers ran", [(8192, 28672)], [1], set()),
         ("large-M row, all peers", [(14336, 4096)], [1024], ALL),
         ("after large-M row", [(8192, 28672)], [1], set()),
         ("large-M row, gemlite only", [(14336, 4096)], [1024], {"gemlite"}),
         ("after gemlite large-M", [(8192, 28672)], [1], set())]
out = []
for name, shapes, ms, peer_set in steps:
    rows = bench(mk, shapes, ms, peer_set, gpu, bw, settle=1.0)
    out.append({"step": name, **{k: rows[0][k] for k in ("K", "N", "M", "ours_us")},
                "humming_us": rows[0].get("humming_us")})
    print("STEP", json.dumps(out[-1]), flush=True)
