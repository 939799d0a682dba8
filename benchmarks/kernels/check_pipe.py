"""GPU check against the fp32 reference of the small-M options: pipelined word loads (``PIPE``,
MMA and GEMV; default set), float32 scales (``FS``, ``--fs``), 2 / 4 chunks' scales per load
(``SV``, ``--fs --sv``) and the H100 table's small-M configs of the two large shapes
(``--table``, K = 8192 so that SV applies). Blocks 32/64/128 (FS / SV: 128 and 256, smaller
blocks fall back), fp16/bf16, with and without zero points, M = 1..37, N = 1000 (a row tail for
every BN), K = 2048 or 2112 (a 128-chunk tail where the block allows), with bias, after a first
call on NaN activations (poisons reused output memory); prints each case over tolerance, the
worst error per config and dtype, and the count.

    python benchmarks/kernels/check_pipe.py [--fs [--sv] | --table]
    python benchmarks/kernels/check_pipe.py --table --keys 14336x4096,4096x14336 \
        --before old_h100.json --part 0/4    # rows that differ from old_h100.json, at each
                                             # key's own K (v11); part i/n: configs i::n
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import import_kernels  # noqa: E402

mk = import_kernels()
CFGS = [dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, PIPE=3),
        dict(MMA=True, BN=128, SPLIT_K=3, num_warps=4, PIPE=4, OUT16=True),
        dict(MMA=True, BN=256, SPLIT_K=2, num_warps=8, PIPE=4, XPERM=True, OUT16=True),
        dict(MMA=True, BN=32, SPLIT_K=1, num_warps=2, PIPE=6),
        dict(MMA=True, BN=64, SPLIT_K=16, num_warps=2, PIPE=6, OUT16=True),
        dict(GEMV=True, BN=64, SPLIT_K=3, num_warps=4, PIPE=4),
        dict(GEMV=True, BN=32, SPLIT_K=1, num_warps=2, PIPE=3)]
FS_CFGS = [dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, FS=2),
           dict(MMA=True, BN=128, SPLIT_K=3, num_warps=4, FS=2, OUT16=True),
           dict(MMA=True, BN=64, SPLIT_K=16, num_warps=2, FS=2, XPERM=True, OUT16=True),
           dict(MMA=True, BN=128, SPLIT_K=3, num_warps=4, FS=1),
           dict(MMA=True, BN=32, SPLIT_K=1, num_warps=2, FS=2),
           # SV: 2 or 4 chunks' scales per load (block 128; 256 falls back to SV 1)
           dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, SV=2),
           dict(MMA=True, BN=128, SPLIT_K=2, num_warps=8, SV=4, FS=2, OUT16=True),
           dict(MMA=True, BN=64, SPLIT_K=8, num_warps=2, SV=2, FS=2, XPERM=True,
                QE="evict_first", OUT16=True),
           dict(MMA=True, BN=256, SPLIT_K=4, num_warps=8, SV=4, XPERM=True, QC=".cg")]
MS = (1, 3, 16, 37)


def main(cfgs=CFGS, ms=MS, groups_for=lambda ci: (32, 64, 128), k_for=None):
    bad = total = 0
    worst = {}
    for ci, cfg in enumerate(cfgs):
        for group in groups_for(ci):
            for dtype in (torch.float16, torch.bfloat16):
                for zero in (True, False):
                    for m in ms:
                        if cfg.get("GEMV") and m > 16:
                            continue
                        torch.manual_seed(1000 * ci + 10 * m + group)
                        n, k = 1000, (2048 + 64 if group < 128 else 2048)
                        if k_for:
                            k = k_for(ci, group)
                        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
                        scale = torch.rand(n, k // group, device="cuda") * 0.02 + 0.002
                        zp = torch.rand(n, k // group, device="cuda") * 15 if zero else None
                        p = mk.pack_weight(codes, scale, zp, group, dtype)
                        x = torch.randn(m, k, device="cuda").to(dtype)
                        b = torch.randn(n, device="cuda").to(dtype)
                        mk.w4a16_matmul(torch.full_like(x, float("nan")), p, b, cfg)  # poison
                        ref = mk.w4a16_reference(x.float(), p._replace(
                            scale=p.scale.float(),
                            zterm=None if p.zterm is None else p.zterm.float()), b.float())
                        y = mk.w4a16_matmul(x, p, b, cfg)
                        torch.cuda.synchronize()
                        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                        tol = 2e-3 if dtype == torch.float16 else 1.2e-2
                        total += 1
                        key = (ci, str(dtype)[6:])
                        worst[key] = max(worst.get(key, 0.0), err)
                        if not err < tol:
                            bad += 1
                            print(f"cfg {ci} group {group} {dtype} zero {zero} m {m}: {err:.3e}")
    for (ci, dt), e in sorted(worst.items()):
        print(f"  cfg {ci} {dt}: max rel err {e:.2e}")
    print(f"check_pipe: {bad} bad of {total}", flush=True)
    return bad


def table_cfgs(shapes=("28672x8192", "8192x28672"), max_ms=(1, 4, 16), before=None):
    """The H100 table's configs for these N x K keys and rows, as (config, K of the key); with
    ``before`` (an older table) only the rows whose config differs from it."""
    import json

    table = json.loads((Path(mk.__file__).parent / "configs" / "h100.json").read_text())
    old = json.loads(Path(before).read_text()) if before else None
    out = []
    for key in shapes:
        for i, r in enumerate(table[key]):
            if r["max_m"] in max_ms and (old is None or old[key][i]["config"] != r["config"]):
                out.append((dict(r["config"]), int(key.split("x")[1])))
    return out


def _arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    if "--table" in sys.argv:  # the shipped small-M configs (default: K = 8192 so SV applies)
        keys = _arg("--keys", "")
        pairs = table_cfgs(*((keys.split(","),) if keys else ()), before=_arg("--before", None))
        part, nparts = map(int, _arg("--part", "0/1").split("/"))
        pairs = pairs[part::nparts]
        print(pairs)
        cfgs = [c for c, _ in pairs]
        k_for = ((lambda ci, g: pairs[ci][1]) if keys else (lambda ci, g: 8192))
        sys.exit(1 if main(cfgs, (1, 3, 9, 16), lambda ci: (128,), k_for) else 0)
    if "--fs" in sys.argv:
        sys.exit(1 if main(FS_CFGS[5:] if "--sv" in sys.argv else FS_CFGS, (1, 5, 16, 37),
                           lambda ci: (128, 256) if ci == 0 else (128,)) else 0)
    sys.exit(1 if main() else 0)
