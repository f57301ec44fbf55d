#!/usr/bin/env bash
# Installs llmcore and everything it needs into the current Python environment, from scratch.
# CPU machines take the pinned CPU torch wheel; a machine that already has a CUDA torch >= 2.11
# keeps it. The extension is built with CMake + Ninja into build/ (CUDA kernels whenever nvcc is
# found; CUDA bindings when torch has CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
"$py" -m pip install -q "setuptools>=64" wheel cmake ninja
"$py" -m pip install -q -e ".[test]" --no-build-isolation
"$py" -c "import llmcore; print('llmcore', llmcore.__version__, llmcore.build_info())"
