# Sourced by the vNN step scripts (bash): the output folder $O (OUT, default /tmp/$1), the
# table's GPU key $G (GPU, default h100), the steps to run $S (STEPS), the repo root as the
# working directory, a copy of the shipped table in $O/$G.json (kept if one is there), and:
#   adopt NAME T1 T2 COMMON... -- RUN1...   run 1 of sweep_large.py (COMMON and RUN1 arguments,
#       e.g. --shipped-only and twins), then in a new process each row's winner again (--from);
#       rows ahead by > 3 % in both go into $O/$G.json; results kernels_NAME_run{1,2}_$G.json
#   bench_rows ROW...   bench_w4a16.py with every peer for each KxN:M, one process per row
set -u
O=${OUT:-/tmp/$1}; mkdir -p "$O"
G=${GPU:-h100}
S=${STEPS:-${2:-123}}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv

adopt() {
  local name=$1 t1=$2 t2=$3 common=()
  shift 3
  while [[ $# -gt 0 && $1 != -- ]]; do common+=("$1"); shift; done
  shift
  timeout "$t1" python3 $K/sweep_large.py "${common[@]}" "$@" --no-peers \
    --out "$O/kernels_${name}_run1_$G.json" 2>&1 | grep -v Warning | tail -"${TAIL:-16}"
  timeout "$t2" python3 $K/sweep_large.py "${common[@]}" \
    --from "$O/kernels_${name}_run1_$G.json" --write-table "$O/$G.json" --no-peers \
    --out "$O/kernels_${name}_run2_$G.json" 2>&1 | grep -v Warning | tail -"${TAIL:-16}"
}

bench_rows() {
  local row
  for row in "$@"; do
    timeout "${TB:-150}" python3 $K/bench_w4a16.py --shapes "${row%%:*}" --ms "${row##*:}" \
      --out "$O/bench_${row/:/_m}_$G.json" 2>&1 | grep -v Warning | tail -3
  done
}
