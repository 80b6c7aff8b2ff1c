#!/usr/bin/env bash
# The GPU check, for a machine without network: build the CUDA extension in place, report, run the whole test
# suite, the benchmark (writing the "auto" dispatch table) and compute-sanitizer memcheck + racecheck over the
# CUDA tests. Each stage fits a 10-minute call on an H100, so a lease can run them as separate commands.
#
#   bash bench/gpu_check.sh [STAGE ...]      stages: install info tests bench compile sanitizer
#                                            (default: install info tests bench sanitizer, in that order)
#   install    pip install --no-build-isolation --no-deps -e . for this GPU's architecture only (fast build;
#              VAEKERNELS_CUDA_ARCHS overrides)
#   tests      python -m pytest -q tests (GPU parity: CUDA vs Triton vs PyTorch)
#   bench      bench/run.py without torch.compile, --save --dispatch --readme (BENCH_ARGS overrides the selection)
#   compile    bench/run.py for torch.compile of the eager formulas alone (about 90 graphs: slow)
#   sanitizer  compute-sanitizer memcheck and racecheck over tests/test_cuda.py at reduced sizes
#
# Logs and results go to bench/results/<device>-<date>-*; when OUT is set (the device tool's folder of files
# to bring back), they are copied there as well. PYTHON picks the interpreter. Exit status: non-zero when any
# stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(install info tests bench sanitizer)
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_')
      if torch.cuda.is_available() else 'no-gpu')")
stamp=$(date +%Y%m%d)
out=bench/results
name="$out/${device}-${stamp}"
mkdir -p "$out"
log="${name}-gpu_check.log"
failed=()
produced=("$log")

step() {  # step NAME COMMAND...: run, tee into the log, remember failures
  local label=$1 start=$SECONDS rc
  shift
  echo "=== $label: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $label: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed+=("$label")
}

sanitizer_path() {
  local found home
  found=$(command -v compute-sanitizer || true)
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -z "$found" ] && [ -n "$home" ] && [ -x "$home/bin/compute-sanitizer" ]; then
      found="$home/bin/compute-sanitizer"
    fi
  done
  echo "$found"
}

for stage in "${stages[@]}"; do
  case $stage in
    install)
      archs=${VAEKERNELS_CUDA_ARCHS:-$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability()
            if torch.cuda.is_available() else '')")}
      step install env ${archs:+VAEKERNELS_CUDA_ARCHS="$archs"} "$PY" -m pip install --no-build-isolation --no-deps \
        -e . ;;
    info)
      step info "$PY" -m vaekernels info ;;
    tests)
      step tests "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests ;;
    bench)
      # shellcheck disable=SC2086 # BENCH_ARGS is a list of options
      step bench "$PY" bench/run.py --no-progress --save --dispatch --readme \
        ${BENCH_ARGS:---competitors eager,vaekernels,vector-quantize-pytorch,diffusers,faiss,pykeops}
      produced+=("$name.json" "$name.md" "$name.png" vaekernels/dispatch.json README.md) ;;
    compile)
      step compile "$PY" bench/run.py --no-progress --competitors torch.compile --json "${name}-compile.json"
      produced+=("${name}-compile.json") ;;
    sanitizer)
      sanitizer=$(sanitizer_path)
      if [ -z "$sanitizer" ]; then
        echo "=== compute-sanitizer not found: memcheck and racecheck not run" | tee -a "$log"
        failed+=(sanitizer)
        continue
      fi
      only_ours=()  # check only vaekernels' kernels (namespace vk) where the sanitizer can filter them: faster
      if "$sanitizer" --help 2>&1 | grep -q -- "--kernel-name "; then only_ours=(--kernel-name kns=vk); fi
      for tool in memcheck racecheck; do
        # VAEKERNELS_TEST_QUICK shrinks the test sizes: instrumented kernels run 10-100x slower. API errors that
        # torch handles itself are not reported; kernel memory errors and races are, and fail the stage.
        step "$tool" env VAEKERNELS_TEST_QUICK=1 "$sanitizer" --tool "$tool" ${only_ours[@]+"${only_ours[@]}"} \
          --report-api-errors no --error-exitcode 1 --log-file "${name}-${tool}.log" \
          "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -m gpu -x
        produced+=("${name}-${tool}.log")
      done ;;
    *)
      echo "unknown stage '$stage' (install info tests bench compile sanitizer)" >&2
      exit 2 ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "=== FAILED: ${failed[*]} (see $log)" | tee -a "$log"
else
  echo "=== all stages passed: ${stages[*]} (log: $log)" | tee -a "$log"
fi
if [ -n "${OUT:-}" ]; then
  for f in "${produced[@]}"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
fi
[ ${#failed[@]} -eq 0 ]
