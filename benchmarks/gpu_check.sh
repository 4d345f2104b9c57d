#!/usr/bin/env bash
# One GPU check that fits a device lease (benchmarks/README.md, "The GPU check"): on an H200 it ends within 8 minutes,
# installs included. Its parts run in this order, each in a time box of its own (seconds), so that one failure or
# hang cannot eat the rest:
#
#   part       box  what
#   install     30  the carried wheels (.whl/) into a private folder; diffusers, CUDA and the tokenizers checked
#   gpu-tests   80  python -m pytest -v tests/test_gpu.py
#   forward     95  one Lite DiT forward, 512x768x121, bf16: diffusers, ours eager, ours compiled (first call apart)
#   vae         60  VAE decode of 121 frames at 512x768, bf16: diffusers, ours, ours channels-last
#   attention   35  NABLA flex attention at 10 % and 100 % block density, L = 47,616, with its compile time
#   pipeline    90  Lite T2V, 2 steps, CFG 5, both pipelines; end-to-end extrapolated to 50 steps
#   memory      80  Lite T2V 512x768x121, 2 steps, VAE tiling: peak memory per phase and s/step of ours resident,
#                   blocks and model offload, and of diffusers' model offload
#              ---
#              470  + 10 s kept for the kill grace and bookkeeping = a 480 s budget. Each box is also cut to what
#                   the budget has left, so the whole never overruns it (a part left with under 10 s is skipped).
#                   In the whole check (no --parts) the last part gets all that is left, its box and what the
#                   others did not use (unless GPU_CHECK_BOXES sets its box).
#                   GPU_CHECK_BUDGET=seconds and GPU_CHECK_BOXES=part=seconds,... change them.
#
# After each part it writes $OUT/gpu-check.json (the summary: every part's status, seconds and headline numbers)
# and $OUT/gpu-check-<part>.json (the part's own JSON, rewritten after each measured row; the install part's goes
# into the summary); everything printed goes to $OUT/gpu-check.log: 8 files, as many as the device tool brings
# back. $OUT defaults to benchmarks/results/. Exit status 0 when every part ran and passed.
#
#   bash benchmarks/gpu_check.sh                         # the whole check (on the GPU machine)
#   bash benchmarks/gpu_check.sh --parts forward,vae     # some parts only (a rerun after a fix)
#   bash benchmarks/gpu_check.sh --smoke                 # the same on the CPU: no installs (the packages are
#                                                        # checked), no GPU tests, the measured parts on tiny models
#                                                        # in one process; $OUT a temp folder when unset
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}
PARTS=(install gpu-tests forward vae attention pipeline memory)
declare -A BOX=([install]=30 [gpu-tests]=80 [forward]=95 [vae]=60 [attention]=35 [pipeline]=90 [memory]=80)
MIN_BOX=10
RESERVE=10  # timeout's 5 s grace before SIGKILL, and the JSON bookkeeping after each part
GPU_CHECK_BOXES=${GPU_CHECK_BOXES:-}
declare -A GIVEN=()
for item in ${GPU_CHECK_BOXES//,/ }; do
  [ -n "${BOX[${item%%=*}]:-}" ] || { echo "gpu_check.sh: GPU_CHECK_BOXES: unknown part in $item" >&2; exit 2; }
  BOX[${item%%=*}]=${item#*=}
  GIVEN[${item%%=*}]=1
done

smoke=0
whole=1  # the whole check (no --parts): its last part gets all that is left of the budget
requested=$(IFS=,; echo "${PARTS[*]}")
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --parts) requested=${2:?--parts needs a comma-separated list}; whole=0; shift ;;
    --parts=*) requested=${1#--parts=}; whole=0 ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for part in ${requested//,/ }; do
  [ -n "${BOX[$part]:-}" ] || { echo "gpu_check.sh: unknown part $part (${PARTS[*]})" >&2; exit 2; }
done
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MEASURED=(forward vae attention pipeline memory)

if [ "$smoke" = 1 ]; then
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-smoke.XXXXXX")}
  echo "gpu_check --smoke: JSON in $OUT"
else
  OUT=${OUT:-$REPO/benchmarks/results}
  # The carried wheels go to a folder of their own, ahead on the path (the machine's own packages stay untouched).
  export GPU_CHECK_SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
  export PYTHONPATH="$REPO:$GPU_CHECK_SITE${PYTHONPATH#"$REPO"}"
fi
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: >"$LOG"
start=$(date +%s)
boxes=$(for part in "${PARTS[@]}"; do printf '%s=%s,' "$part" "${BOX[$part]}"; done)
smoke_flag=$([ "$smoke" = 1 ] && echo --smoke)
# shellcheck disable=SC2086
"$PY" benchmarks/gpu_check.py init --out "$OUT" --budget "$BUDGET" --boxes "${boxes%,}" --parts "$requested" \
  $smoke_flag || exit 1

# A machine that received the repository alone: the tokenizers and configs travel as .reference/ (README.md);
# pipeline.py reads KANDINSKY5_REFERENCE_DIR, tests/conftest.py ../shared/reference beside the checkout.
if [ -z "${KANDINSKY5_REFERENCE_DIR:-}" ] && [ ! -d "$REPO/../shared/reference" ] && [ -d "$REPO/.reference" ]; then
  export KANDINSKY5_REFERENCE_DIR=$REPO/.reference
  { mkdir -p "$REPO/../shared" && ln -sfn "$REPO/.reference" "$REPO/../shared/reference"; } 2>/dev/null ||
    echo "note: could not link ../shared/reference; the GPU tests that need the tokenizers will fail" | tee -a "$LOG"
fi

# One part, in the time box; its output goes to the log. "smoke" runs the requested measured parts in one process
# (the imports once), tiny models on the CPU, each recorded as it ends.
run_part() {
  case $1 in
    install)
      if [ "$smoke" = 1 ]; then
        echo "smoke: no installs"
      elif compgen -G ".whl/*.whl" >/dev/null; then
        rm -rf "$GPU_CHECK_SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$GPU_CHECK_SITE" .whl/*.whl ||
          return
      else
        echo "no .whl/*.whl: nothing to install"
      fi
      # shellcheck disable=SC2086
      "$PY" benchmarks/gpu_check.py part install --out "$OUT" $smoke_flag
      ;;
    gpu-tests) "$PY" -m pytest -v -p no:cacheprovider tests/test_gpu.py ;;
    smoke) "$PY" benchmarks/gpu_check.py part ${smoke_parts//,/ } --out "$OUT" --smoke --record ;;
    *) "$PY" benchmarks/gpu_check.py part "$1" --out "$OUT" ;;
  esac
}
export -f run_part
export PY OUT smoke smoke_flag GPU_CHECK_SITE

# Run "$1" in a time box of "$2" seconds (cut to the budget's rest; the last part to run gets all of the rest) and
# record it as the parts "$3" (default "$1").
boxed() {
  local name=$1 box=$2 parts=${3:-$1} left offset started rc
  left=$((start + BUDGET - RESERVE - $(date +%s)))
  if ((box > left)) || [ "$name" = "$last" ]; then box=$left; fi
  if ((box < MIN_BOX)); then
    local why="a time box of ${box} s (under ${MIN_BOX}; ${left} s of the budget left)"
    echo "== $parts: skipped, $why" | tee -a "$LOG"
    for part in ${parts//,/ }; do "$PY" benchmarks/gpu_check.py record "$part" --out "$OUT" --skipped "$why"; done
    return
  fi
  echo "== $parts (time box ${box} s)" | tee -a "$LOG"
  offset=$(stat -c %s "$LOG")
  started=$(date +%s.%N)
  # to the log file, not through a pipe: a stray child holding a pipe open could outlive the box
  timeout -k 5 "$box" bash -c 'run_part "$1"' _ "$name" >>"$LOG" 2>&1
  rc=$?
  tail -c +$((offset + 1)) "$LOG"
  ((rc == 124 || rc == 137)) && echo "== $parts: stopped by its ${box} s time box" | tee -a "$LOG"
  # (the smoke's parts record themselves; a part it never reached is recorded here with the exit status)
  for part in ${parts//,/ }; do
    if [ "$name" != smoke ] || grep -q '"status": "\(pending\|running\)"' "$OUT/gpu-check-$part.json" 2>/dev/null ||
      [ ! -e "$OUT/gpu-check-$part.json" ]; then
      "$PY" benchmarks/gpu_check.py record "$part" --out "$OUT" --rc "$rc" --started "$started" --box "$box" \
        --log "$LOG" --log-offset "$offset"
    fi
  done
}

# In the whole check, the last box runs in all that is left of the budget (a rerun of some parts keeps its boxes,
# and so does a part whose box GPU_CHECK_BOXES sets). The smoke's measured parts run in one box, last.
last=""
if [ "$whole" = 1 ]; then
  if [ "$smoke" = 1 ]; then last=smoke; else last=${PARTS[-1]}; fi
  [ -n "${GIVEN[$last]:-}" ] && last=""
fi
smoke_parts=""
smoke_box=0
for part in "${PARTS[@]}"; do
  [[ ",$requested," == *",$part,"* ]] || continue
  if [ "$smoke" = 1 ] && [ "$part" = gpu-tests ]; then
    "$PY" benchmarks/gpu_check.py record gpu-tests --out "$OUT" \
      --skipped "smoke: tests/test_gpu.py needs CUDA (the CPU suite collects it, skipped)"
  elif [ "$smoke" = 1 ] && [[ " ${MEASURED[*]} " == *" $part "* ]]; then
    smoke_parts=${smoke_parts:+$smoke_parts,}$part
    smoke_box=$((smoke_box + BOX[$part]))
  else
    boxed "$part" "${BOX[$part]}"
  fi
done
export smoke_parts
[ -n "$smoke_parts" ] && boxed smoke "$smoke_box" "$smoke_parts"
"$PY" benchmarks/gpu_check.py verdict --out "$OUT" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
