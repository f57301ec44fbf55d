#!/usr/bin/env bash
# CMAKE_CUDA_COMPILER_LAUNCHER: runs the nvcc command line it is given, shows its output as usual,
# and keeps a copy (the `-Xptxas -v` resource report: registers, stack, spills) in
# $LLMCORE_PTXAS_LOG_DIR/<object name>.log, which tests/test_build.py reads.
# It also appends, per arch, the launch bounds every kernel was compiled with — the `.maxntid` of
# each `.entry` in the PTX nvcc generated (kept with -keep in a scratch directory, so nothing is
# compiled twice) — as lines "llmcore launch bounds: sm_<arch> <mangled name> maxntid <x,y,z|none>".
# test_build.py multiplies them with the register counts: registers x threads must fit the SM's
# 64K-register file, or a launch at that block size fails with "too many resources requested".
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
keep=$(mktemp -d)
"$@" -keep -keep-dir "$keep" >"$tmp" 2>&1
rc=$?
cat "$tmp" >&2
for ptx in "$keep"/*.ptx; do
  [ -e "$ptx" ] || continue
  arch=${ptx##*.compute_}
  arch=${arch%.ptx}
  awk -v arch="$arch" '
    /\.entry[ \t]/ {
      for (i = 1; i <= NF; ++i) if ($i == ".entry") { name = $(i + 1) }
      sub(/\(.*/, "", name); nt = "none"; next
    }
    name != "" && /^[ \t]*\.maxntid/ { nt = $2 $3 $4; next }
    name != "" && /^[ \t]*\{/ { print "llmcore launch bounds: sm_" arch " " name " maxntid " nt; name = "" }
  ' "$ptx" >>"$tmp"
done
rm -rf "$keep"
mv "$tmp" "$log_dir/$obj.log"
exit $rc
