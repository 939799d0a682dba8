#!/bin/bash
# v39 (NOTES.md): fp16 odd nibble planes read in place (dequant._asm; 197 -> 182 SASS
# instructions in the WS consumer loop at M = 64, bit-identical numbers). (1) The GPU tests
# (the asm changed for every fused and WS kernel); (2) interleaved A/B of the shipped configs
# against their ODD_SHIFT twins (the previous dequantization) where the kernel is bound by its
# instructions: M = 64 / 256 / 1024 on the large shapes; (3) the whole table with every peer.
#   OUT=/tmp/v39 bash benchmarks/kernels/v39_odd_planes.sh    (STEPS=12 to skip the table;
#   STEPS=4: (4) alone)
set -u
O=${OUT:-/tmp/v39}; mkdir -p "$O/ab"
S=${STEPS:-123}
cd "$(dirname "$0")/../.."
[[ $S == *1* ]] && timeout ${TT:-300} python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
  -p no:logging tests/ 2>&1 | tail -6 | tee "$O/gpu_tests.txt"
if [[ $S == *2* ]]; then
  for row in 8192x28672:64 28672x8192:64 8192x28672:256 28672x8192:256 8192x28672:1024 \
             4096x14336:256; do
    timeout 150 python3 benchmarks/kernels/ab.py --shape "${row%%:*}" --m "${row##*:}" \
      --rounds 9 --twin ODD_SHIFT=true --out "$O/ab/ab_${row/:/_m}.json" 2>&1 \
      | grep -v Warn | tail -3 | cut -c1-70
  done
fi
[[ $S == *3* ]] && timeout ${TB:-480} python3 benchmarks/kernels/bench_w4a16.py \
  --out "$O/kernels_v39_full_h100.json" 2>&1 | grep -v Warn | tail -32
# (4) what bounds M = 64 now (STEPS=4): Nsight Compute of the shipped WGS 4 tile on both large
# shapes, no peer; the stall reasons and L2 / DRAM throughput lines (at M = 64 each 256-row tile
# re-reads the whole activation tile from L2, as many bytes as its weights)
if [[ $S == *4* ]]; then
  for sh in 8192x28672 28672x8192; do
    OUT=$O SHAPE=$sh MS=64 PEER=none TAG=ncu_${sh}_m64 TAIL=4 \
      bash benchmarks/kernels/ncu_profile.sh > /dev/null
    grep -E "Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall" \
      "$O/ncu_${sh}_m64.txt" > "$O/ncu_${sh}_m64_summary.txt"
    rm -f "$O/ncu_${sh}_m64.ncu-rep" "$O/ncu_${sh}_m64.csv"
  done
fi
exit 0
