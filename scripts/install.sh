#!/usr/bin/env bash
# Installs charmlp, built from this checkout, into the current Python environment.
#
# The extension is compiled against the torch that is already installed
# (pip --no-build-isolation), so torch comes first: an existing torch is kept;
# otherwise torch==2.13.0 is installed (on the charmlp build machines that is the
# CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "${CHARMLP_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet scikit-build-core pybind11 cmake ninja
"$PY" -m pip install --quiet --no-build-isolation ".[test]"
"$PY" -c "import charmlp, torch; print('charmlp installed:', 'torch', torch.__version__, '| cuda kernels:', charmlp.has_cuda_kernels())"
