#!/usr/bin/env bash
# shellcheck disable=SC2016  # the commands are single-quoted: PY, NAME, SANITIZER expand when a stage runs them
# The GPU check, for a machine without network (bench/results/README.md: which command when, what to commit).
#
#   bash bench/gpu_check.sh first-contact [STAGE ...]
#     The first run on a GPU: five stages in priority order, each under its own time limit so that a hang or a
#     slow stage cannot eat the rest, 540 s in all (9 minutes of a 10-minute command), build included. With STAGE
#     names, only those (to rerun one that failed).
#       build      the extension for this GPU's architecture only, then `python -m vaekernels info`
#       smoke      bench/gpu_smoke.py: every kernel variant the ops launch, on tiny inputs, against the reference;
#                  stops at the first wrong op and names it
#       parity     tests/test_cuda.py and tests/test_backends.py at reduced sizes (VAEKERNELS_TEST_QUICK=1): CUDA
#                  and Triton against the reference, forward and backward, exact indices, same-seed samples; when
#                  the CUDA tests pass, `bench/dispatch.py --cuda-verified` records in vaekernels/dispatch.json that
#                  CUDA passed on this architecture ("auto" takes CUDA only where such a record is committed)
#       bench      bench/run.py --first-contact (one shape per op: times, % of the copy bandwidth, kernel launches)
#                  and bench/patch_memory.py on vector-quantize-pytorch's default VectorQuantize, patched or not;
#                  the Triton search untuned (its first config); bench/overhead.py at 64x128: every op against its
#                  eager formula, host µs per call and kernel launches; bench/roofline.py --measured: each
#                  Triton search time against its roofline prediction
#       sanitizer  compute-sanitizer memcheck over the smoke test
#     <name>-first-contact-summary.json says which stages ran, passed or failed, and how long each took, and
#     holds the search's measured-against-predicted times ("roofline") once the bench stage has written them.
#   bash bench/gpu_check.sh plan
#     The first-contact stages, one line each, in run order: `<stage> <time limit in seconds> <command>`.
#   bash bench/gpu_check.sh [STAGE ...]
#     The longer stages, for later GPU runs; each fits a 10-minute command on an H100 (default: install info tests
#     bench sanitizer, in that order):
#       install    pip install --no-build-isolation --no-deps -e . for this GPU's architecture only
#       info       python -m vaekernels info
#       tests      the whole test suite (GPU parity: CUDA vs Triton vs PyTorch)
#       bench      bench/run.py without torch.compile, --save --dispatch --readme (BENCH_ARGS overrides the selection)
#       compile    bench/run.py for torch.compile of the eager formulas alone (about 90 graphs: slow)
#       lfq        bench/lfq.py: LFQ at 2^18 codes x 16384 tokens, Triton and PyTorch backends and
#                  vector-quantize-pytorch (at fewer tokens), time, peak memory, fraction of the tensor-core bound
#       ibq        bench/ibq.py: IBQ with entropy at 2^18 codes x 2048 tokens x 256, Triton and PyTorch backends and
#                  the dense formula, time, peak memory, fraction of the tensor-core bound
#       audio      bench/audio.py: the audio codecs' quantizers (EnCodec k-means init, EnCodec, DAC and SNAC training
#                  steps), original against vk.patch, time, peak memory and kernel launches per step (needs the
#                  packages: docs/gpu.md)
#       sanitizer  compute-sanitizer memcheck and racecheck (stages memcheck, racecheck) over tests/test_cuda.py
#                  at reduced sizes
#     <name>-gpu_check-summary.json: as for first-contact.
#
# Logs and results go to bench/results/<device>-<date>-* (<name>); when OUT is set (the device tool's folder of
# files to bring back), to OUT as well: the log as it grows, the rest as each stage ends. Stage commands run in
# bash with PY (the interpreter: PYTHON, else python, else python3), NAME (bench/results/<device>-<date>) and SANITIZER
# (compute-sanitizer's path) set, and VAEKERNELS_CUDA_ARCHS defaulting to this GPU's architecture. Exit status:
# non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# Each command once, as the stages run it (and `plan` prints it).
install='"$PY" -m pip install --no-build-isolation --no-deps -e .'
info='"$PY" -m vaekernels info'
smoke='"$PY" bench/gpu_smoke.py'
# API errors that torch handles itself are not reported; kernel memory errors and races are, and fail the stage
sanitize='"${SANITIZER:?compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)}" --report-api-errors no'
sanitize+=' --error-exitcode 1'
# parity: the CUDA tests first (no Triton compiles), recording CUDA as verified when they pass, then Triton's; the
# stage fails when either part does
quick_tests='VAEKERNELS_TEST_QUICK=1 "$PY" -m pytest -v --tb=short -p no:cacheprovider'
parity="$quick_tests"' tests/test_cuda.py tests/test_backends.py -k cuda'
parity+=' && "$PY" bench/dispatch.py --cuda-verified "$NAME-gpu_check.log"; cuda=$?; '
parity+="$quick_tests"' tests/test_backends.py -k "not cuda" && exit $cuda'
# bench: the Triton search in its first config, untuned (autotuning compiles every config per shape: a minute more;
# the later bench stage tunes)
untuned='VAEKERNELS_AUTOTUNE=0 "$PY"'
first_bench="$untuned"' bench/run.py --first-contact --no-progress --competitors eager,vaekernels,'
first_bench+='vector-quantize-pytorch,diffusers --json "$NAME-first-contact-bench.json"'
first_bench+=' && '"$untuned"' bench/patch_memory.py --case vqpytorch-16384x256'
first_bench+=' --json "$NAME-first-contact-patch.json" && "$PY" bench/overhead.py --sizes 64x128 --rounds 5'
first_bench+=' --json "$NAME-first-contact-overhead.json" && "$PY" bench/roofline.py --measured'
first_bench+=' "$NAME-first-contact-bench.json" --json "$NAME-first-contact-roofline.json"'

# The first-contact stages in run order: stage, time limit in seconds (540 in all), command. The sanitizer checks
# every kernel the smoke test launches, Triton's included.
FIRST_CONTACT=(
  "build 90 $install && $info"
  "smoke 120 $smoke"
  "parity 150 $parity"
  "bench 120 $first_bench"
  "sanitizer 60 $sanitize --tool memcheck --log-file \"\$NAME-first-contact-memcheck.log\" $smoke --jobs 1"
)
# The later stages: stage, time limit, command; "sanitizer" stands for memcheck and racecheck, over the CUDA tests
# at reduced sizes (VAEKERNELS_TEST_QUICK: instrumented kernels run 10-100x slower).
check_cuda='VAEKERNELS_TEST_QUICK=1 '"$sanitize"' $SANITIZER_FILTER'
cuda_tests='"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -m gpu -x'
LATER=(
  "install 300 $install"
  "info 60 $info"
  "tests 540 \"\$PY\" -m pytest -q -p no:cacheprovider --durations=15 tests"
  "bench 540 \"\$PY\" bench/run.py --no-progress --save --dispatch --readme \$BENCH_ARGS"
  "compile 540 \"\$PY\" bench/run.py --no-progress --competitors torch.compile --json \"\$NAME-compile.json\""
  "lfq 540 \"\$PY\" bench/lfq.py"
  "ibq 540 \"\$PY\" bench/ibq.py"
  "audio 540 \"\$PY\" bench/audio.py --json \"\$NAME-audio.json\""
  "memcheck 540 $check_cuda --tool memcheck --log-file \"\$NAME-memcheck.log\" $cuda_tests"
  "racecheck 540 $check_cuda --tool racecheck --log-file \"\$NAME-racecheck.log\" $cuda_tests"
)

stage_names() {  # stage_names ROW...: the stage of each table row, space-separated
  local row names=()
  for row in "$@"; do names+=("${row%% *}"); done
  echo "${names[*]}"
}

invocation="bash bench/gpu_check.sh $*"
rows=()
if [ "${1:-}" = plan ]; then
  printf '%s\n' "${FIRST_CONTACT[@]}"
  exit 0
elif [ "${1:-}" = first-contact ]; then
  mode=first-contact
  shift
  known=" $(stage_names "${FIRST_CONTACT[@]}") "
  for stage in "$@"; do
    if [[ $known != *" $stage "* ]]; then
      echo "unknown first-contact stage '$stage' (${known:1:-1})" >&2
      exit 2
    fi
  done
  wanted=" ${*:-$known} "
  for row in "${FIRST_CONTACT[@]}"; do  # in the table's order, whatever the arguments' order
    [[ $wanted != *" ${row%% *} "* ]] || rows+=("$row")
  done
else
  mode=gpu_check
  known=" $(stage_names "${LATER[@]}") "
  [ $# -gt 0 ] || set -- install info tests bench sanitizer
  for stage in "$@"; do
    case $stage in
      sanitizer) expanded=(memcheck racecheck) ;;
      *) expanded=("$stage") ;;
    esac
    for name in "${expanded[@]}"; do
      if [[ $known != *" $name "* ]]; then
        echo "unknown stage '$name' (install info tests bench compile lfq ibq audio sanitizer; or first-contact, plan)" >&2
        exit 2
      fi
      for row in "${LATER[@]}"; do [ "${row%% *}" != "$name" ] || rows+=("$row"); done
    done
  done
fi

PY=${PYTHON:-$(command -v python || echo python3)}
gpu=$(timeout --signal=TERM --kill-after=10 120 "$PY" -c 'import torch
if torch.cuda.is_available():
    print(torch.cuda.get_device_name().replace(" ", "_"), "%d%d" % torch.cuda.get_device_capability())' | tail -n 1)
read -r device capability <<< "$gpu"
device=${device:-no-gpu}
if [ -n "$capability" ]; then
  export VAEKERNELS_CUDA_ARCHS=${VAEKERNELS_CUDA_ARCHS:-$capability}  # the extension for this GPU only: fast build
fi
started_at=$(date -Iseconds)
NAME="bench/results/${device}-$(date +%Y%m%d)"
log="$NAME-gpu_check.log"
summary="$NAME-$mode-summary.json"
SANITIZER=$(command -v compute-sanitizer || true)
for home in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -z "$SANITIZER" ] && [ -n "$home" ] && [ -x "$home/bin/compute-sanitizer" ]; then
    SANITIZER="$home/bin/compute-sanitizer"
  fi
done
SANITIZER_FILTER=""  # only vaekernels' CUDA kernels (namespace vk) where the sanitizer can filter them: faster
if [ -n "$SANITIZER" ] && "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name "; then
  SANITIZER_FILTER="--kernel-name kns=vk"
fi
BENCH_ARGS=${BENCH_ARGS:---competitors eager,vaekernels,vector-quantize-pytorch,diffusers,faiss,pykeops}
export PY NAME SANITIZER SANITIZER_FILTER BENCH_ARGS
mkdir -p bench/results
logs=("$log")
[ -z "${OUT:-}" ] || logs+=("$OUT/${log##*/}")
started=$(mktemp)  # files newer than this were written by this run
trap 'rm -f "$started"' EXIT
OUT_CAP=$((15 * 1024 * 1024))  # each file brought back stays under the device tool's 16 MiB

names=() limits=() commands=() status=() seconds=() exits=()
for row in "${rows[@]}"; do
  read -r stage limit command <<< "$row"
  names+=("$stage") limits+=("$limit") commands+=("$command") status+=("not run") seconds+=(null) exits+=(null)
done

json() {  # json STRING: STRING as a JSON string (names and commands hold no control characters)
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

write_summary() {  # the summary JSON, in bench/results and OUT: each stage's limit, status, seconds, exit status
  local i sep="" total=0
  for i in "${!names[@]}"; do total=$((total + limits[i])); done
  {
    printf '{\n "command": %s,\n "device": %s,\n "capability": %s,\n "date": %s,\n "limit_s": %d,\n "stages": [' \
      "$(json "$invocation")" "$(json "$device")" "$(json "${capability:+sm_$capability}")" \
      "$(json "$started_at")" "$total"
    for i in "${!names[@]}"; do
      printf '%s\n  {"stage": %s, "limit_s": %d, "status": %s, "seconds": %s, "exit": %s, "command": %s}' "$sep" \
        "$(json "${names[i]}")" "${limits[i]}" "$(json "${status[i]}")" "${seconds[i]}" "${exits[i]}" \
        "$(json "${commands[i]}")"
      sep=","
    done
    printf '\n ]'
    if [ "$mode" = first-contact ] && [ -s "$NAME-first-contact-roofline.json" ]; then
      printf ',\n "roofline": '
      cat "$NAME-first-contact-roofline.json"
    fi
    printf '\n}\n'
  } > "$summary"
  [ -z "${OUT:-}" ] || cp "$summary" "$OUT/"
}

bring_back() {  # copy what this run wrote (results, the dispatch table, README, docs/performance.md) to OUT; of a file over the cap, its end
  local f
  [ -n "${OUT:-}" ] || return 0
  for f in "$NAME".* "$NAME"-* vaekernels/dispatch.json README.md docs/performance.md; do
    if [ -f "$f" ] && [ "$f" -nt "$started" ] && [ "$f" != "$log" ] && [ "$f" != "$summary" ]; then
      tail -c "$OUT_CAP" "$f" > "$OUT/${f##*/}"
    fi
  done
}

failed=()
for i in "${!names[@]}"; do
  status[i]=running
  write_summary
  echo "=== ${names[i]} (limit ${limits[i]} s): ${commands[i]}" | tee -a "${logs[@]}"
  start=$SECONDS
  timeout --signal=TERM --kill-after=10 "${limits[i]}" bash -c "${commands[i]}" < /dev/null 2>&1 | tee -a "${logs[@]}"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status[i]=passed ;;
    124) status[i]="timed out" ;;
    137) status[i]="killed" ;;
    *) status[i]=failed ;;
  esac
  seconds[i]=$((SECONDS - start))
  exits[i]=$rc
  echo "=== ${names[i]}: ${status[i]} (exit $rc) after ${seconds[i]} s" | tee -a "${logs[@]}"
  [ "$rc" -eq 0 ] || failed+=("${names[i]}")
  write_summary
  bring_back
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "=== FAILED: ${failed[*]} (log: $log, summary: $summary)" | tee -a "${logs[@]}"
else
  echo "=== all stages passed: ${names[*]} (log: $log, summary: $summary)" | tee -a "${logs[@]}"
fi
[ ${#failed[@]} -eq 0 ]
