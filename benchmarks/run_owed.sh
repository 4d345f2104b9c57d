#!/usr/bin/env bash
# The GPU runs still owed (benchmarks/README.md), in priority order; pass their numbers to run some:
#   bash benchmarks/run_owed.sh 1 2
# Each run's JSON lands in benchmarks/results/ (and is copied to $OUT when that is set); a failed run is reported
# and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RUNS=(
  ""
  "forward.py --model lite"
  "vae.py"
  "pipeline.py --model lite"
  "forward.py --model pro --repeats 2"
  "pipeline.py --model pro --height 768 --width 1024 --steps 2 --offload"
  "attention.py"
)
status=0
for n in "${@:-1 2 3 4 5 6}"; do
  run="${RUNS[$n]:-}"
  if [ -z "$run" ]; then echo "no run $n (1..$((${#RUNS[@]} - 1)))"; status=2; continue; fi
  echo "== run $n: python benchmarks/$run"
  # shellcheck disable=SC2086
  python "benchmarks/"$run || { echo "== run $n failed"; status=1; }
done
if [ -n "${OUT:-}" ] && compgen -G "benchmarks/results/*.json" >/dev/null; then cp benchmarks/results/*.json "$OUT"/; fi
exit $status
