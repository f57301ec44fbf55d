#!/usr/bin/env bash
# CMAKE_CUDA_COMPILER_LAUNCHER: runs the nvcc command line it is given, shows its output as usual,
# and keeps a copy (the `-Xptxas -v` resource report: registers, stack, spills) in
# $LLMCORE_PTXAS_LOG_DIR/<object name>.log, which tests/test_build.py reads.
set -u
log_dir="${LLMCORE_PTXAS_LOG_DIR:?}"
mkdir -p "$log_dir"
obj=unknown
prev=""
for a in "$@"; do
  if [ "$prev" = "-o" ]; then obj=$(basename "$a"); fi
  prev="$a"
done
tmp=$(mktemp)
"$@" >"$tmp" 2>&1
rc=$?
cat "$tmp" >&2
mv "$tmp" "$log_dir/$obj.log"
exit $rc
