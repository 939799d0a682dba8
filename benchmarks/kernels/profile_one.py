"""Run one W4A16 call (for Nsight Compute): python profile_one.py K N M [GEMV|TC]."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import make_problem  # noqa: E402
from common import import_kernels  # noqa: E402

k, n, m = (int(a) for a in sys.argv[1:4])
mk = import_kernels()
_, _, _, _, packed = make_problem(mk, k, n)
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    mk.w4a16_matmul(x, packed)
torch.cuda.synchronize()
