#!/usr/bin/env bash
# The one script to run on a GPU machine (the H200 lent by the `device` tool):
# builds charmlp with its CUDA kernels, runs the CUDA tests and the CUDA benchmark,
# and leaves every log and result under $OUT. Sized to finish in ~8 minutes.
#
# Expects on that machine: torch (CUDA build), nvcc, cmake, ninja, pybind11,
# scikit-build-core, pytest; no internet (nothing is downloaded).
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Environment: TORCH_CUDA_ARCH_LIST (default: the GPU's own arch, e.g. 9.0 on an H200),
# PYTHON (default python3), CHARMLP_GPU_TEST_TIMEOUT (s, default 330),
# CHARMLP_GPU_BENCH_TIMEOUT (s, default 120).
# Exit status: 0 when the build and every CUDA test passed (benchmarks never fail it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/build/gpu_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT"
start=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# --- environment -------------------------------------------------------------------------
{
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  git -C "$ROOT" log -1 --oneline 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
log "env: $(tail -n 2 "$OUT/env.txt" | head -n 1)"

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)"
fi
export TORCH_CUDA_ARCH_LIST
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The toolkit root: one with both nvcc and the runtime headers (a bare `nvcc` on PATH
# may be a wrapper script outside the toolkit).
NVCC_ON_PATH="$(command -v nvcc || true)"
for cand in "${CUDA_HOME:-}" /usr/local/cuda \
    "${NVCC_ON_PATH:+$(dirname "$(dirname "$(readlink -f "$NVCC_ON_PATH")")")}"; do
  if [[ -n "$cand" && -x "$cand/bin/nvcc" && -f "$cand/include/cuda_runtime.h" ]]; then
    export CUDA_HOME="$cand"
    break
  fi
done
CUDA_DEFINES=()
[[ -n "${CUDA_HOME:-}" ]] && CUDA_DEFINES=(-Ccmake.define.CMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")

# --- build: a venv on top of the system packages, so nothing is downloaded ----------------
VENV="${CHARMLP_GPU_VENV:-/tmp/charmlp-gpu-venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" >> "$OUT/build.log" 2>&1
fi
PY="$VENV/bin/python"
log "building (arch $TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-?}, $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
if ! PATH="$VENV/bin:$PATH" "$PY" -m pip install --no-index --no-build-isolation --no-deps \
    --force-reinstall -v -Cbuild-dir=build/gpu -Ccmake.define.CHARMLP_CUDA=ON "${CUDA_DEFINES[@]}" "$ROOT" \
    >> "$OUT/build.log" 2>&1; then
  log "BUILD FAILED (see build.log)"
  tail -n 60 "$OUT/build.log"
  exit 1
fi
"$PY" - > "$OUT/build_info.txt" 2>&1 <<'EOF'
import torch, charmlp
info = charmlp.build_info()
print(info)
for op in ["embed_linear_tanh", "embed_linear_tanh_backward", "cross_entropy", "cross_entropy_backward",
           "linear_cross_entropy", "linear_cross_entropy_backward", "mlp_sgd_step"]:
    print(op, torch._C._dispatch_has_kernel_for_dispatch_key(f"charmlp::{op}", "CUDA"))
EOF
log "built: $(head -n 1 "$OUT/build_info.txt" | cut -c1-200)"

# --- tests -------------------------------------------------------------------------------
log "running tests/test_cuda_ops.py"
timeout "${CHARMLP_GPU_TEST_TIMEOUT:-330}" "$PY" -m pytest tests/test_cuda_ops.py -q -rfEs \
  -p no:cacheprovider --junitxml="$OUT/test_cuda_ops.xml" > "$OUT/test_cuda_ops.log" 2>&1
test_rc=$?
log "tests rc=$test_rc: $(tail -n 1 "$OUT/test_cuda_ops.log")"

# --- benchmark ---------------------------------------------------------------------------
bench_timeout="${CHARMLP_GPU_BENCH_TIMEOUT:-120}"
if [[ -f benchmarks/bench_cuda.py ]]; then
  log "running benchmarks/bench_cuda.py"
  timeout "$bench_timeout" "$PY" benchmarks/bench_cuda.py --out "$OUT" > "$OUT/bench_cuda.log" 2>&1
  log "bench_cuda rc=$?"
else
  # No CUDA benchmark in benchmarks/ yet: measure the issue's two targets directly.
  log "running the built-in CUDA timing (no benchmarks/bench_cuda.py)"
  timeout "$bench_timeout" "$PY" - "$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1 <<'EOF'
import json, sys, time
import torch
import charmlp
from charmlp import ops

dev = "cuda"
V, T, E, H = 27, 3, 10, 200
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

def wall(fn, n=300, warm=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6  # us per call, launch overhead included

def events(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2] * 1e3  # median us

torch.manual_seed(0)
def model(fused):
    m = charmlp.MLPLanguageModel(V, T, E, H, fused=fused, device=dev)
    return m

# 1) Training step at B = 32.
B = 32
idx = torch.randint(0, V, (B, T), device=dev); y = torch.randint(0, V, (B,), device=dev)
eager = model(False); fused = model(True)
eager_params = list(eager.parameters())
def eager_step():
    loss = eager(idx, y)[1]
    grads = torch.autograd.grad(loss, eager_params)
    with torch.no_grad():
        torch._foreach_add_(eager_params, grads, alpha=-0.1)
res["step_b32_eager_us"] = wall(eager_step)
fused_autograd = model(True)
fp = list(fused_autograd.parameters())
def fused_autograd_step():
    loss = fused_autograd(idx, y, return_logits=False)[1]
    grads = torch.autograd.grad(loss, fp)
    with torch.no_grad():
        torch._foreach_add_(fp, grads, alpha=-0.1)
res["step_b32_charmlp_autograd_us"] = wall(fused_autograd_step)
res["step_b32_charmlp_fused_us"] = wall(lambda: fused.sgd_step(idx, y, 0.1))
params = [p.detach() for p in fused.parameters()]
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        ops.mlp_sgd_step(idx, y, *params, 0.1)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    ops.mlp_sgd_step(idx, y, *params, 0.1)
res["step_b32_charmlp_fused_graph_us"] = wall(g.replay)
res["step_b32_fused_kernel_gpu_us"] = events(lambda: ops.mlp_sgd_step(idx, y, *params, 0.1))
try:
    compiled = torch.compile(eager_step, mode="reduce-overhead")
    res["step_b32_eager_compile_reduce_overhead_us"] = wall(compiled, n=200, warm=30)
except Exception as e:  # report, do not fail
    res["step_b32_eager_compile_error"] = repr(e)[:300]
res["speedup_b32_fused_vs_eager"] = res["step_b32_eager_us"] / res["step_b32_charmlp_fused_us"]
res["speedup_b32_graph_vs_eager"] = res["step_b32_eager_us"] / res["step_b32_charmlp_fused_graph_us"]

# 2) Full batch (228,146 rows) forward + backward.
B = 228146
idx = torch.randint(0, V, (B, T), device=dev); y = torch.randint(0, V, (B,), device=dev)
for name, m in (("eager", model(False)), ("charmlp", model(True))):
    ps = list(m.parameters())
    def fb():
        loss = m(idx, y, return_logits=(name == "eager"))[1]
        torch.autograd.grad(loss, ps)
    res[f"fullbatch_fwd_bwd_{name}_us"] = events(fb)
    if name == "charmlp":
        det = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        res["fullbatch_fwd_bwd_charmlp_deterministic_us"] = events(fb, n=10)
        torch.use_deterministic_algorithms(det)
res["fullbatch_mlp_sgd_step_us"] = events(lambda: ops.mlp_sgd_step(idx, y, *params, 0.01))

for k, v in res.items():
    print(f"{k:48s} {v:.1f}" if isinstance(v, float) else f"{k:48s} {v}")
json.dump(res, open(sys.argv[1], "w"), indent=2)
EOF
  log "built-in timing rc=$?"
fi
grep -E "_us|speedup" "$OUT/bench_cuda.log" >> "$OUT/summary.txt" 2>/dev/null || true

log "done in $(( $(date +%s) - start ))s; tests rc=$test_rc"
exit "$test_rc"
