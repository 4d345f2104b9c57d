#!/usr/bin/env bash
# The GPU runs still owed (benchmarks/README.md), in priority order; pass their numbers to run some:
#   bash benchmarks/run_owed.sh          # run 0: the GPU check (benchmarks/gpu_check.sh), the first thing to run
#   bash benchmarks/run_owed.sh 1 2      # the full forward and VAE benchmarks (each fits one 10-minute command)
# Run 0 writes its JSON to $OUT (benchmarks/results/ when unset) itself. The others write to benchmarks/results/;
# what they wrote is copied to $OUT when that is set. A failed run is reported and the next one still runs.
# Runs 8-12 are the memory table (benchmarks/memory.py), one device command each; expected on an H200 (estimates
# from the H100 figures in shared/reference, dense attention): 8 ~4 min, 9 ~7 min, 10 ~7 min, 11 ~4 min, 12 ~3 min.
# Run 13 (benchmarks/parallel_overhead.py, ~1 min) fails when a degree-1 run costs 1 % or more over the plain one.
# Runs 14-15 are the image models' pipelines (benchmarks/image_pipeline.py, 1024x1024, 50 steps, guidance 3.5):
# expected on an H200 about 2-3 min each (imports and ~15 B random weights ~45 s; per pipeline a 2-step warm-up and
# 50 CFG steps of ~0.2-0.3 s, the step's roofline at the H100 ceilings being 0.13 s; the official figure is 13 s an
# image on an H100), well inside a 10-minute command.
# The runs that quantize also put the torchao wheel of .whl/quantization/ on the path (only they: an import of
# diffusers must not depend on it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RUNS=(
  "gpu_check.sh"
  "forward.py --model lite"
  "vae.py"
  "pipeline.py --model lite"
  "forward.py --model pro --repeats 2"
  "pipeline.py --model pro --height 768 --width 1024 --steps 2 --offload"
  "attention.py"
  "magcache.py"
  # the memory table: Lite, every mode (warm-up run of 1 step per row)
  "memory.py --model lite --modes resident,blocks,model,sequential,diffusers"
  # Pro at 768x1280x121 (a CFG step of the dense 19B DiT takes about a minute: no warm-up run, the first of the 2
  # steps warms up), two rows per command
  "memory.py --model pro --modes resident,blocks --warmup-steps 0"
  "memory.py --model pro --modes model,diffusers --warmup-steps 0"
  "memory.py --model pro --modes sequential --warmup-steps 0"
  # one Pro DiT forward at 768x1280x121 in bf16 and with FP8 weights (needs torchao: .whl/quantization/)
  "memory.py --model pro --modes none --fp8-forward --repeats 1"
  # the single-GPU overhead of the parallel code paths at degree 1 (Lite 512x768x121, NCCL world of one): < 1 %
  "parallel_overhead.py --model lite"
  # the image models: text-to-image, then editing a synthetic 1024x1024 picture (each ~2-3 min on an H200)
  "image_pipeline.py"
  "image_pipeline.py --edit"
)
# A machine that received the repository alone (benchmarks/README.md): the carried wheels and reference files.
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d "$SITE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
QUANTIZATION_SITE=$SITE-quantization
if compgen -G ".whl/quantization/*.whl" >/dev/null && [ ! -d "$QUANTIZATION_SITE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$QUANTIZATION_SITE" \
    .whl/quantization/*.whl
fi
if [ -z "${KANDINSKY5_REFERENCE_DIR:-}" ] && [ ! -d ../shared/reference ] && [ -d .reference ]; then
  export KANDINSKY5_REFERENCE_DIR=$PWD/.reference
fi
status=0
started=$(mktemp)  # only the JSON written by these runs goes to $OUT (the device brings back 8 files at most)
for n in "${@:-0}"; do
  run="${RUNS[$n]:-}"
  if [ -z "$run" ]; then echo "no run $n (0..$((${#RUNS[@]} - 1)))"; status=2; continue; fi
  if [ "$n" = 0 ]; then
    echo "== run 0: bash benchmarks/gpu_check.sh"
    bash benchmarks/gpu_check.sh || { echo "== run 0 failed"; status=1; }
    continue
  fi
  echo "== run $n: python3 benchmarks/$run"
  path=$PYTHONPATH
  [[ "$run" == *"--fp8-forward"* || "$run" == *"--quantize-transformer"* ]] && path=$QUANTIZATION_SITE:$PYTHONPATH
  # shellcheck disable=SC2086
  PYTHONPATH=$path python3 "benchmarks/"$run || { echo "== run $n failed"; status=1; }
done
if [ -n "${OUT:-}" ] && [ -d benchmarks/results ] && [ "$(realpath "$OUT")" != "$(realpath benchmarks/results)" ]; then
  find benchmarks/results -maxdepth 1 -name '*.json' -newer "$started" -exec cp {} "$OUT"/ \;
fi
rm -f "$started"
exit $status
