#!/usr/bin/env bash
# The one command for a GPU machine (see ../shared/GPU.md): build for sm_90a with CUDA bindings,
# run every CUDA test (tests marked `cuda`), compute-sanitizer memcheck and racecheck over the op
# tests, then `pytest bench/` for every op with the peers that are installed, and print a short
# table last. Full logs go to $OUT (or ./gpu_out). Peers the machine lacks (liger, bitsandbytes)
# come from ./.whl, filled on the development machine by ../shared/gpu/prepare_wheels.sh.
#
#   bash scripts/gpu_check.sh [quick]      # quick: skip racecheck and the large benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mode=${1:-full}
summary=()
step() {  # step NAME LOG CMD...: runs CMD, logs it, records pass/fail
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-34s %-6s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" $((SECONDS - t0)) "$log")")
  tail -n 3 "$OUT/$log"
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
export LLMCORE_CUDA=1 LLMCORE_CUDA_ARCHS=${LLMCORE_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}
step "build (sm_${LLMCORE_CUDA_ARCHS})" build.log python3 -m pip install -v -e . --no-build-isolation --no-deps
cp build/llmcore_build_summary.txt "$OUT/" 2>/dev/null
step "tests (all, cuda + cpu)" tests.log python3 -m pytest tests -q -x --timeout=900 -p no:cacheprovider
step "memcheck (op tests, cuda)" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
  python3 -m pytest tests/ops -q -m cuda -k "not compile and not hypothesis" -p no:cacheprovider
if [ "$mode" != quick ]; then
  step "racecheck (op tests, cuda)" racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 -m pytest tests/ops -q -m cuda -k "not compile and not hypothesis and not opcheck" -p no:cacheprovider
fi
LLMCORE_BENCH_DIR="$OUT" step "benchmarks (pytest bench/)" bench.log \
  python3 -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=median,iqr
echo
echo "================ llmcore gpu_check ================"
cat "$OUT/llmcore_build_summary.txt" 2>/dev/null
printf '%s\n' "${summary[@]}"
sed -n '/llmcore benchmarks/,$p' "$OUT/bench.log" | grep -E '^\|' | grep -E 'llmcore|liger|bnb|sdpa|compile' | head -60
