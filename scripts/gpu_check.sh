#!/usr/bin/env bash
# The one command for a lent GPU machine (../shared/GPU.md, issue 15): a prioritized run that ends
# inside a global deadline (LLMCORE_GPU_DEADLINE_S, default 540 s, under the device's 600 s per
# command). Stages, most important first, each under `timeout` with its own budget and skipped
# (SKIP, with the reason) when that budget no longer fits the time left:
#   preflight   GPU visible, peers (liger, bitsandbytes from ./.whl) importable, nvidia-smi, the
#               measured copy GB/s and bf16 matmul TFLOP/s ceilings -> $OUT/ceilings.json
#   build       sm_90a only (LLMCORE_CUDA_ARCHS); a failed build or preflight skips everything after
#   test_<op>   the `cuda`-marked tests of one op file (flash_attn, rms_norm, moe, rope, swiglu, nf4,
#               then any other tests/ops file with CUDA cases), no -x, JUnit XML in logs.tgz,
#               failing test ids in $OUT/failures.txt; opcheck/compile/hypothesis cases wait for `rest`
#   memcheck    compute-sanitizer memcheck over scripts/gpu_smoke.py (odd shapes, misaligned views),
#               llmcore's kernels only (--kernel-name kns=llmcore)
#   racecheck   racecheck over the shared-memory kernels' smoke cases (flash_attn, moe, rms_norm)
#   bench       scripts/gpu_bench_quick.py: one chip-filling shape per op vs its peer, the train
#               step of minimind-26m -> $OUT/bench_quick.md
#   rest        with the time left: opcheck/compile/hypothesis CUDA cases, then `pytest bench/`
# $OUT/summary.txt gets one line per stage as it ends (name, PASS/FAIL/TIMEOUT/SKIP, seconds,
# detail), so a run cut off from outside still returns what finished. $OUT (default ./gpu_out)
# holds at most 6 files: summary.txt ceilings.json failures.txt ptxas.txt bench_quick.md logs.tgz.
#
#   bash scripts/gpu_check.sh            # the run (on the GPU machine)
#   bash scripts/gpu_check.sh --plan     # the stages and budgets, on any machine
# Device call: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600). A full run
# plus the machine's start uses ~11 of the 15 device minutes: rerun at once (the machine still warm,
# build/ kept, so the build is incremental) only what failed, with a shorter deadline, e.g.
#   LLMCORE_GPU_STAGES=build,test_rope LLMCORE_GPU_DEADLINE_S=150 bash scripts/gpu_check.sh
# Environment: OUT, LLMCORE_GPU_DEADLINE_S, LLMCORE_GPU_STAGES=build,test_rope,... (run only these;
# preflight always runs), LLMCORE_GPU_BUDGET_<stage>=S (override a budget), LLMCORE_GPU_LOGS (log
# folder, default /tmp/llmcore_gpu_logs). Test hook (tests/test_gpu_check.py):
# LLMCORE_GPU_CHECK_FAKE=1 replaces every stage's command by LLMCORE_GPU_CMD_<stage> (default `true`).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SELF="$ROOT/scripts/gpu_check.sh"

# ---------------------------------------------------------------- the stages and their budgets (s)
OP_ORDER=(flash_attn rms_norm moe rope swiglu nf4)
op_files() {  # the op test files in priority order, then any other tests/ops file with CUDA cases
  local op f
  for op in "${OP_ORDER[@]}"; do [ -f "tests/ops/test_$op.py" ] && echo "$op"; done
  for f in tests/ops/test_*.py; do
    op=$(basename "$f" .py); op=${op#test_}
    [[ " ${OP_ORDER[*]} " == *" $op "* ]] && continue
    grep -qE 'mark\.cuda|DEVICES' "$f" && echo "$op"
  done
}
# test budgets include ~10 s of pytest + torch + CUDA start; flash_attn 139, moe 150, rope 136 cases
declare -A BUDGET=([preflight]=25 [build]=180 [test_flash_attn]=45 [test_rms_norm]=25 [test_moe]=25
                   [test_rope]=20 [test_swiglu]=15 [test_nf4]=15 [test_launch_limits]=30 [test_qk_norm_rope]=20 [memcheck]=40 [racecheck]=30 [bench]=50)
TEST_DEFAULT_BUDGET=15
DEADLINE=${LLMCORE_GPU_DEADLINE_S:-540}
STAGES=(preflight build)
for op in $(op_files); do STAGES+=("test_$op"); done
STAGES+=(memcheck racecheck bench rest)
fixed=0
for s in "${STAGES[@]}"; do
  [ "$s" = rest ] && continue
  b=${BUDGET[$s]:-$TEST_DEFAULT_BUDGET}
  o="LLMCORE_GPU_BUDGET_$s"; b=${!o:-$b}
  BUDGET[$s]=$b; fixed=$((fixed + b))
done
BUDGET[rest]=$((DEADLINE - fixed > 0 ? DEADLINE - fixed : 0))  # nominal: it gets whatever is left

describe() {
  case $1 in
    preflight) echo "torch sees the GPU, peers importable, nvidia-smi, copy/matmul ceilings" ;;
    build) echo "LLMCORE_CUDA_ARCHS=${LLMCORE_CUDA_ARCHS:-90a} setup.py build_ext --inplace; abort all on failure" ;;
    test_*) echo "pytest tests/ops/${1}.py -m cuda (no opcheck/compile/hypothesis)" ;;
    memcheck) echo "compute-sanitizer memcheck, scripts/gpu_smoke.py, llmcore kernels" ;;
    racecheck) echo "compute-sanitizer racecheck, smoke of flash_attn/moe/rms_norm" ;;
    bench) echo "scripts/gpu_bench_quick.py: one shape per op vs peer, minimind-26m step" ;;
    rest) echo "time left: opcheck/compile/hypothesis CUDA cases, then pytest bench/" ;;
  esac
}

if [ "${1:-}" = "--plan" ]; then
  total=0
  printf '%-20s %6s  %s\n' stage budget what
  for s in "${STAGES[@]}"; do
    printf '%-20s %5ss  %s\n' "$s" "${BUDGET[$s]}" "$(describe "$s")"
    total=$((total + BUDGET[$s]))
  done
  printf '%-20s %5ss  (deadline %ss; rest also gets the time earlier stages leave unused)\n' total "$total" "$DEADLINE"
  exit 0
fi

# ---------------------------------------------------------------- one stage's real command
LOGS=${LLMCORE_GPU_LOGS:-/tmp/llmcore_gpu_logs}
SITE=/tmp/llmcore_site
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$ROOT/gpu_out}
export OUT LLMCORE_GPU_LOGS="$LOGS"
PYTEST=(python3 -m pytest -q -p no:cacheprovider -o junit_family=xunit2)

run_stage() {  # the real command of stage $1; exit 77 = SKIP (its last DETAIL: line says why)
  local s=$1 rc
  case $s in
    preflight)
      if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
          || echo "WARN: installing .whl failed"
      else
        echo "WARN: no .whl/ (run ../shared/gpu/prepare_wheels.sh on the development machine): peers missing"
      fi
      nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || echo "WARN: nvidia-smi failed"
      python3 scripts/gpu_preflight.py "$OUT/ceilings.json" ;;
    build)
      LLMCORE_CUDA=1 LLMCORE_CUDA_ARCHS=${LLMCORE_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
        python3 setup.py build_ext --inplace || return 1
      cat build/llmcore_build_summary.txt 2>/dev/null
      mkdir -p "$LOGS/ptxas" && cp build/ptxas/*.log build/llmcore_build_summary.txt "$LOGS/ptxas/" 2>/dev/null
      { cat build/llmcore_build_summary.txt; for f in build/ptxas/*.log; do echo "=== $f"; grep -E 'Compiling entry|registers|spill|smem' "$f"; done; } \
        >"$OUT/ptxas.txt" 2>/dev/null
      python3 -c "import llmcore, sys; b = llmcore.build_info(); print('DETAIL:', b); sys.exit(0 if b['cuda_bindings'] else 1)" ;;
    test_*)
      local opt=()
      python3 -c "import pytest_timeout" 2>/dev/null && opt=(--timeout=30)  # one hung test must not eat the file's budget
      "${PYTEST[@]}" "tests/ops/$s.py" -m cuda -k "not opcheck and not compile and not hypothesis" \
        --junitxml="$LOGS/junit_$s.xml" "${opt[@]}"
      rc=$?; [ $rc -eq 5 ] && { echo "DETAIL: no cuda-marked tests collected"; return 77; }; return $rc ;;
    memcheck|racecheck)
      command -v compute-sanitizer >/dev/null || { echo "DETAIL: compute-sanitizer not found"; return 77; }
      local args=(--tool memcheck) smoke=()
      [ "$s" = racecheck ] && args=(--tool racecheck) && smoke=(--ops flash_attn,moe,rms_norm)
      [ "$s" = memcheck ] && export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every tensor its own allocation
      compute-sanitizer "${args[@]}" --kernel-name kns=llmcore --error-exitcode 1 --print-limit 30 \
        python3 scripts/gpu_smoke.py "${smoke[@]}"
      rc=$?
      if [ $rc -ne 0 ] && grep -q "Device not supported" "$LOGS/$s.log" 2>/dev/null; then
        echo "DETAIL: compute-sanitizer: device not supported on this machine"; return 77
      fi
      return $rc ;;
    bench) python3 scripts/gpu_bench_quick.py --out "$OUT/bench_quick.md" --ceilings "$OUT/ceilings.json" ;;
    rest)
      "${PYTEST[@]}" tests/ops -m cuda -k "opcheck or compile or hypothesis" --junitxml="$LOGS/junit_rest.xml"
      rc=$?
      LLMCORE_BENCH_DIR="$LOGS" python3 -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc \
        --benchmark-columns=median,iqr >"$LOGS/rest_bench.log" 2>&1
      echo "DETAIL: rest tests rc=$rc; pytest bench/ rc=$? (log rest_bench.log)"
      [ $rc -eq 5 ] && rc=0; return $rc ;;
  esac
}

if [ "${1:-}" = "--stage" ]; then  # internal: run_stage under the outer `timeout`
  run_stage "$2"; exit $?
fi

# ---------------------------------------------------------------- the run
mkdir -p "$OUT"
rm -rf "$LOGS"; mkdir -p "$LOGS"
SUMMARY="$OUT/summary.txt"
T0=$SECONDS
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
printf '# llmcore gpu_check  commit %s  %s  deadline %ss%s\n' "$commit" "$(date -u +%FT%TZ)" "$DEADLINE" \
  "$([ "${LLMCORE_GPU_CHECK_FAKE:-0}" = 1 ] && echo '  FAKE stage commands')" >"$SUMMARY"
: >"$OUT/failures.txt"
ABORT=""
finish() {
  local why=$1
  printf '# %s after %ss\n' "$why" $((SECONDS - T0)) >>"$SUMMARY"
  tar czf "$LOGS.tgz" -C "$LOGS" . 2>/dev/null && mv -f "$LOGS.tgz" "$OUT/logs.tgz"
}
trap 'finish "interrupted (signal)"; exit 143' TERM INT

record() {  # record NAME STATUS SECONDS DETAIL: one summary line, written now
  local line
  line=$(printf '%-20s %-7s %4ss  %s' "$1" "$2" "$3" "$4")
  echo "$line" >>"$SUMMARY"
  echo "[gpu_check] $line"
}

detail_of() {  # the last DETAIL: / pytest / sanitizer summary line of a log, else its last line
  local d
  d=$(grep -E '^DETAIL: |ERROR SUMMARY:|RACECHECK SUMMARY:|[0-9]+ (passed|failed|errors?|skipped|deselected)' "$1" 2>/dev/null | tail -n 1)
  [ -z "$d" ] && d=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1)
  d=${d#DETAIL: }; d=${d//=/}; d=$(echo "$d" | tr -s ' ' | sed 's/^ //')
  echo "${d:0:160}"
}

collect_failures() {  # failing test ids of a JUnit file -> failures.txt
  [ -f "$1" ] || return 0
  python3 - "$1" >>"$OUT/failures.txt" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    for bad in list(tc.findall("failure")) + list(tc.findall("error")):
        msg = (bad.get("message") or "").strip().splitlines()
        print(f"{tc.get('classname')}::{tc.get('name')}  {bad.tag}: {msg[0][:200] if msg else ''}")
EOF
}

selected() {
  [ -z "${LLMCORE_GPU_STAGES:-}" ] || [ "$1" = preflight ] && return 0
  [[ ",$LLMCORE_GPU_STAGES," == *",$1,"* ]]
}

for s in "${STAGES[@]}"; do
  elapsed=$((SECONDS - T0)); left=$((DEADLINE - elapsed))
  b=${BUDGET[$s]}
  if [ "$s" = rest ]; then b=$((left - 5)); fi
  if [ -n "$ABORT" ]; then record "$s" SKIP 0 "$ABORT"; continue; fi
  if ! selected "$s"; then record "$s" SKIP 0 "not in LLMCORE_GPU_STAGES"; continue; fi
  if [ "$s" = rest ] && [ "$b" -lt 20 ]; then record "$s" SKIP 0 "only ${left}s left"; continue; fi
  if [ "$b" -gt "$left" ]; then
    record "$s" SKIP 0 "budget ${b}s > ${left}s left"
    [[ $s == preflight || $s == build ]] && ABORT="$s SKIP: nothing to run"
    continue
  fi
  log="$LOGS/$s.log"
  t=$SECONDS
  if [ "${LLMCORE_GPU_CHECK_FAKE:-0}" = 1 ]; then
    v="LLMCORE_GPU_CMD_$s"
    timeout -k 2 "$b" bash -c "${!v:-true}" >"$log" 2>&1
  else
    timeout -k 10 "$b" bash "$SELF" --stage "$s" >"$log" 2>&1
  fi
  rc=$?
  dt=$((SECONDS - t))
  case $rc in
    0) st=PASS ;;
    77) st=SKIP ;;
    124|137) st=TIMEOUT ;;
    *) st=FAIL ;;
  esac
  d=$(detail_of "$log")
  [ "$st" = TIMEOUT ] && d="killed at its ${b}s budget; last: $d"
  if [ "$st" = FAIL ] && [ "$s" = build ]; then  # the first compiler error says more than the last line
    e=$(grep -m1 -iE 'error|FAILED:' "$log"); [ -n "$e" ] && d="${e:0:160}"
  fi
  [ "$st" = FAIL ] && d="rc=$rc: $d"
  record "$s" "$st" "$dt" "$d"
  [[ $s == test_* || $s == rest ]] && collect_failures "$LOGS/junit_$s.xml"
  if [ "$st" = TIMEOUT ] && [[ $s == test_* ]]; then echo "$s: TIMEOUT after ${b}s (tests after the last one finished did not run)" >>"$OUT/failures.txt"; fi
  if [ "$s" = preflight ] && [ "$st" != PASS ]; then ABORT="preflight $st: nothing can run"; fi
  if [ "$s" = build ] && [ "$st" != PASS ]; then ABORT="build $st: nothing to run"; fi
  tar czf "$LOGS.tgz" -C "$LOGS" . 2>/dev/null && mv -f "$LOGS.tgz" "$OUT/logs.tgz"
done
finish "done"
echo
echo "================ llmcore gpu_check ($OUT) ================"
cat "$SUMMARY"
[ -s "$OUT/failures.txt" ] && { echo "---- failures"; head -n 60 "$OUT/failures.txt"; }
[ -s "$OUT/bench_quick.md" ] && { echo "---- bench"; cat "$OUT/bench_quick.md"; }
grep -qE ' (FAIL|TIMEOUT) ' "$SUMMARY" && exit 1
exit 0
