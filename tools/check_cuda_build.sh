#!/usr/bin/env bash
# Compile-and-link check of charmlp's CUDA kernels on a machine without a GPU.
#
# Builds the extension with CUDA (CHARMLP_CUDA=ON) against the CUDA 13.0 build of
# torch in a separate venv (.venv-cuda, created on first use), in its own build
# directory (build/cuda-check; the CPU build in build/cp3*-* is never touched),
# then loads the built module and checks that every charmlp op has a CUDA kernel
# registered with the dispatcher and that build_info() reports CUDA. Nothing runs
# on a GPU: that is tools/gpu_check.sh's job.
#
# Environment:
#   TORCH_CUDA_ARCH_LIST    archs to compile for (default "8.0;9.0")
#   CHARMLP_CUDA_VENV       venv path (default <repo>/.venv-cuda)
#   CHARMLP_CUDA_TORCH      torch requirement for the venv (default torch==2.14.1)
#   CUDA_HOME               toolkit root (default /usr/local/cuda)
#
# Idempotent: a second run reuses the venv and the build directory (incremental).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHARMLP_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_REQ="${CHARMLP_CUDA_TORCH:-torch==2.14.1}"
BUILD_DIR="build/cuda-check"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# 2 cores here: one compile job per core (the .cu files are the long poles).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

cd "$ROOT"
start=$(date +%s)
log() { echo "[check_cuda_build +$(( $(date +%s) - start ))s] $*"; }

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "check_cuda_build: no nvcc at $CUDA_HOME/bin/nvcc; set CUDA_HOME" >&2
  exit 1
fi

# 1. The venv with the CUDA build of torch.
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]] || ! "$PY" -c "import torch, cmake, ninja, scikit_build_core, pybind11; assert torch.version.cuda" 2>/dev/null; then
  log "creating $VENV with $TORCH_REQ (CUDA build)"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check "$TORCH_REQ" cmake ninja scikit-build-core pybind11
fi
log "venv: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

# 2. Build (compile + link) with CUDA into the venv. The CMake from the cmake wheel
#    (4.x) is needed: the system one (3.25) does not know torch's CUDA20 dialect.
#    The CPU kernels only in their baseline copy: the CPU build compiles and tests all of
#    them, and three copies would double this check's time.
log "building with CUDA for arch '$TORCH_CUDA_ARCH_LIST' in $BUILD_DIR"
PATH="$VENV/bin:$PATH" "$PY" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall \
  -Cbuild-dir="$BUILD_DIR" \
  -Ccmake.define.CHARMLP_CUDA=ON \
  -Ccmake.define.CMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -Ccmake.define.CUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -Ccmake.define.CHARMLP_CPU_CAPABILITIES=default \
  -Cbuild.verbose=false \
  "$ROOT"
log "build done"

# 3. Load the built module (by path: the Python package's own imports are not under
#    test here) and check the CUDA registrations.
"$PY" - <<'EOF'
import glob, importlib.util, os, sys, sysconfig
import torch

site = sysconfig.get_paths()["purelib"]
paths = glob.glob(os.path.join(site, "charmlp", "_C*.so"))
assert len(paths) == 1, f"expected one charmlp/_C*.so in {site}, found {paths}"
spec = importlib.util.spec_from_file_location("charmlp._C", paths[0])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
info = mod.build_info()

ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
              if s.name.startswith("charmlp::")})  # every op of csrc/ops.cpp
if len(ops) < 7:
    sys.exit(f"check_cuda_build: FAILED (the charmlp library registered only {ops})")
missing = [op for op in ops
           if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"charmlp::{op}", "CUDA")]
print(f"build_info: cuda={info['cuda']} arch={info['cuda_arch_list']!r} "
      f"cuda_version={info['cuda_version']!r} torch={info['torch_version']}")
for op in ops:
    print(f"  charmlp::{op:32s} CUDA kernel: {'yes' if op not in missing else 'MISSING'}")
if missing or info["cuda"] is not True:
    sys.exit("check_cuda_build: FAILED (missing CUDA kernels or build_info()['cuda'] is not True)")
print(f"check_cuda_build: OK, {len(ops)} ops have CUDA kernels")
EOF
log "total $(( $(date +%s) - start ))s"
