"""Loading the native extension: build info and the torch-version guard."""

from __future__ import annotations

import subprocess
import sys

import torch

import charmlp


def test_build_info_matches_the_running_torch():
    info = charmlp.build_info()
    assert info["torch_version"] == torch.__version__
    for key in ("cuda", "cuda_arch_list", "cuda_version", "openmp", "compiler", "cxx_flags", "cpu_capabilities",
                "cpu_capabilities_supported", "cpu_capability"):
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


def test_eager_entry_points_and_torch_ops_agree_and_modes_still_see_the_ops():
    """ops.* calls the extension's pybind11 entry points in eager mode (csrc/module.cpp) and
    torch.ops under a __torch_function__ mode, which must then see the charmlp op."""
    from torch.overrides import TorchFunctionMode

    from charmlp import ops

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 27, (8, 3), generator=g)
    table, W, b = torch.randn(27, 4, generator=g), torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    W2, b2, y = torch.randn(27, 5, generator=g), torch.randn(27, generator=g), torch.randint(0, 27, (8,), generator=g)
    calls = {
        "embed_linear_tanh": lambda: ops.embed_linear_tanh(idx, table, W, b),
        "cross_entropy": lambda: ops.cross_entropy(torch.randn(8, 27, generator=torch.Generator().manual_seed(1)), y),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(torch.tanh(torch.randn(8, 5)), W2, b2, y),
        "mlp_cross_entropy": lambda: ops.mlp_cross_entropy(idx, y, table, W, b, W2, b2),
        "mlp_logits_cross_entropy": lambda: ops.mlp_logits_cross_entropy(idx, y, table, W, b, W2, b2),
    }
    for name, call in calls.items():
        torch.manual_seed(2)
        eager = call()
        seen.clear()
        with Record():
            torch.manual_seed(2)
            through_torch_ops = call()
        assert any(name in s for s in seen), (name, seen)
        for a, e in zip(eager if isinstance(eager, tuple) else (eager,),
                        through_torch_ops if isinstance(through_torch_ops, tuple) else (through_torch_ops,)):
            assert torch.equal(a, e), name


def test_eager_calls_take_the_pybind_entry_point(monkeypatch):
    from charmlp import ops

    calls = []
    real = ops._C._eager_cross_entropy
    monkeypatch.setattr(ops._C, "_eager_cross_entropy", lambda *a: calls.append(1) or real(*a))
    ops.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert calls == [1]
    torch.compile(lambda x, y: ops.cross_entropy(x, y), fullgraph=True, backend="eager")(
        torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert calls == [1]  # traced through torch.ops
