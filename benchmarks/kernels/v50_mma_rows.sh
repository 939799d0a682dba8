#!/bin/bash
# v50 (NOTES.md, v49b-v49e): the small-M MMA rows after the byte-swapped tiled words. On the
# swapped words the 2-warp, 4-rows-a-thread kernels lost 3-7 % on the H100 (one program per SM
# fewer at M <= 8: 132 registers against 128), and the H200 table's M = 1-8 rows of the large
# shapes are such rows, tuned before the swap. For every MMA row of the GPU's table with
# 2 warps or 4 rows a thread: interleaved A/B at M = max_m of the shipped row against the
# row-by-row words (--rows-arm, the pre-swap register allocation), PARTNER (4 rows a thread)
# and 2 rows a thread (twice the warps, or half the BN at 8 warps; 2-warp rows of 2 rows:
# twice the BN over 4 warps); a twin > 3 % faster in 6 of 7 rounds replaces the row
# (ab.py --write-table). On an H200 (GPU=h100 on an H100), then the whole table:
#   OUT=/tmp/v50 GPU=h200 bash benchmarks/kernels/v50_mma_rows.sh && cp /tmp/v50/h200.json kernels/configs/
set -u
O=${OUT:-/tmp/v50}; mkdir -p "$O/ab"
G=${GPU:-h200}
cd "$(dirname "$0")/../.."
cp "kernels/configs/$G.json" "$O/$G.json"
python3 - "$G" > "$O/rows.txt" <<'PY'
import json, sys
table = json.load(open(f"kernels/configs/{sys.argv[1]}.json"))
for key, rows in table.items():
    n, k = key.split("x")                    # table keys are N x K; ab.py takes K x N
    for r in rows:
        c = r["config"]
        if not c.get("MMA") or c.get("WS") or r["max_m"] > 16:
            continue
        nw = c.get("num_warps", 4)
        per_thread = c["BN"] // (8 * nw)
        if nw != 2 and per_thread != 4:
            continue
        twins = ["PARTNER=true"] if per_thread == 4 else []
        if per_thread == 4:                  # 2 rows a thread: twice the warps, or half the BN
            twins.append(f"num_warps={2 * nw}" if nw <= 4 else f"BN={c['BN'] // 2}")
        else:                                # 2 warps of 2 rows: twice the BN over 4 warps
            twins.append(f"BN={2 * c['BN']},num_warps=4")
        print(f"{k}x{n}", r["max_m"], " ".join("--twin " + t for t in twins))
PY
cat "$O/rows.txt"
while read -r sh m twins; do
  echo "== $sh M=$m"
  # shellcheck disable=SC2086
  timeout 90 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --min-wins 6 \
    --rows-arm $twins --write-table "$O/$G.json" --out "$O/ab/ab_${sh}_m$m.json" 2>&1 \
    | grep -v Warn | tail -6 | cut -c1-100
done < "$O/rows.txt"
exit 0
