"""Loading the native extension: build info and the torch-version guard."""

from __future__ import annotations

import subprocess
import sys

import torch

import charmlp


def test_build_info_matches_the_running_torch():
    info = charmlp.build_info()
    assert info["torch_version"] == torch.__version__
    for key in ("cuda", "cuda_arch_list", "cuda_version", "openmp", "compiler", "cxx_flags", "simd"):
        assert key in info
    assert info["cuda"] == charmlp.has_cuda_kernels()


def test_every_op_has_a_cpu_kernel_and_a_fake_kernel():
    names = charmlp.ops.op_names()
    assert {"embed_linear_tanh", "cross_entropy", "linear_cross_entropy", "mlp_cross_entropy", "mlp_sgd_step"} <= set(names)
    for op in names:
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"charmlp::{op}", "CPU"), op
        # register_fake (ops.py): what torch.compile and meta tensors trace through
        assert torch._library.simple_registry.singleton.find(f"charmlp::{op}").fake_impl.kernel is not None, op


def test_import_under_another_torch_version_is_a_clear_error():
    code = (
        "import torch; torch.__version__ = '0.0.1'\n"
        "try:\n    import charmlp\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR charmlp was built against torch" in out.stdout, out.stdout + out.stderr
    assert "0.0.1" in out.stdout and "--no-build-isolation" in out.stdout
