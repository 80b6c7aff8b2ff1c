#!/usr/bin/env bash
# One command for a GPU machine without network: build the CUDA extension in place, report, run the whole test
# suite, the benchmark (when bench/run.py exists) and compute-sanitizer memcheck + racecheck over the CUDA tests.
# Logs go to bench/results/<device>-<date>-*.log; the exit status is non-zero when any step failed.
# Usage: bash bench/gpu_check.sh   (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_')
      if torch.cuda.is_available() else 'no-gpu')")
stamp=$(date +%Y%m%d)
out=bench/results
mkdir -p "$out"
log="$out/${device}-${stamp}-gpu_check.log"
: > "$log"
failed=()

step() {  # step NAME COMMAND...: run, tee into the log, remember failures
  local name=$1 start=$SECONDS rc
  shift
  echo "=== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step install "$PY" -m pip install --no-build-isolation --no-deps -e .
step info "$PY" -m vaekernels info
step tests "$PY" -m pytest -q tests
if [ -f bench/run.py ]; then
  step bench "$PY" bench/run.py --json "$out/${device}-${stamp}.json"
fi

sanitizer=$(command -v compute-sanitizer || true)
for home in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -z "$sanitizer" ] && [ -n "$home" ] && [ -x "$home/bin/compute-sanitizer" ]; then
    sanitizer="$home/bin/compute-sanitizer"
  fi
done
if [ -n "$sanitizer" ]; then
  only_ours=()  # check only vaekernels' kernels (namespace vk) where the sanitizer can filter them: much faster
  if "$sanitizer" --help 2>&1 | grep -q -- "--kernel-name "; then only_ours=(--kernel-name kns=vk); fi
  for tool in memcheck racecheck; do
    # VAEKERNELS_TEST_QUICK shrinks the test sizes: instrumented kernels run 10-100x slower. API errors that
    # torch handles itself are not reported; kernel memory errors and races are, and fail the step.
    step "$tool" env VAEKERNELS_TEST_QUICK=1 "$sanitizer" --tool "$tool" ${only_ours[@]+"${only_ours[@]}"} \
      --report-api-errors no --error-exitcode 1 --log-file "$out/${device}-${stamp}-${tool}.log" \
      "$PY" -m pytest -q tests/test_cuda.py -m gpu -x
  done
else
  echo "=== compute-sanitizer not found: memcheck and racecheck skipped" | tee -a "$log"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "=== FAILED: ${failed[*]} (see $log)" | tee -a "$log"
  exit 1
fi
echo "=== all steps passed (log: $log)" | tee -a "$log"
