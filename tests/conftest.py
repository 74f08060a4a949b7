"""Shared fixtures and assertions for the charmlp tests (the plain-PyTorch model they check
against is charmlp.reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import charmlp
from charmlp import _C

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES_TXT = REPO_ROOT.parent / "shared" / "data" / "names.txt"

# Float tolerances by dtype for comparing fused kernels with the reference (the
# fused kernels sum in a different order, and use their own exp/tanh).
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`train(threads=N)` sets torch's thread count for the process, as the command line
    does; a test that trains must not change it for the tests after it."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(params=["auto", "direct", "folded"])
def embed_algorithm(request):
    """Runs a test under each CPU embed_linear_tanh algorithm, restoring 'auto' after."""
    _C._set_embed_algorithm(request.param)
    yield request.param
    _C._set_embed_algorithm("auto")


@pytest.fixture(params=["auto", "small", "aten"])
def output_gemm(request):
    """Runs a test under each CPU linear_cross_entropy GEMM path, restoring 'auto' after."""
    _C._set_output_gemm(request.param)
    yield request.param
    _C._set_output_gemm("auto")


@pytest.fixture(params=[True, False], ids=["grouped", "ungrouped"])
def context_grouping(request):
    """Runs a test with the CPU whole-model kernels' context grouping on and off (restored after)."""
    _C._set_context_grouping(request.param)
    yield request.param
    _C._set_context_grouping(True)


@pytest.fixture
def names_path():
    if not NAMES_TXT.exists():
        pytest.skip(f"{NAMES_TXT} is not present")
    return NAMES_TXT


def assert_close(actual, expected, dtype=None, **kw):
    tol = dict(TOL[dtype or expected.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected, **tol)


def assert_bitwise(actual, expected):
    """Same shape, dtype and bits (NaN included, which torch.equal would call unequal)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[actual.dtype]
    assert torch.equal(actual.view(as_int), expected.view(as_int)), (actual, expected)


def assert_all_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_bitwise(a, e)


@pytest.fixture(params=["fast", "naive"])
def kernel_impl(request):
    """Runs a test with charmlp's fast kernels and again with the kernel tour's naive ones
    (charmlp.set_kernel_impl: embed_linear_tanh and cross_entropy, forward and backward, on
    CPU and CUDA), restoring the previous choice after."""
    with charmlp.use_kernel_impl(request.param):
        yield request.param
