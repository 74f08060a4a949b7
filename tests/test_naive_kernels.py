"""The kernel tour's naive kernels (charmlp.set_kernel_impl): the switch itself, and what the
``kernel_impl`` parametrization of test_embed_linear_tanh.py and test_cross_entropy.py (every
test there runs against the fast and the naive kernels) leaves out. The naive CUDA kernels
run in test_cuda_emulated.py."""

from __future__ import annotations

import pytest
import torch

import charmlp
from charmlp import ops, reference
from conftest import assert_close

P = torch.ops.charmlp


def test_the_default_is_fast_and_build_info_reports_the_choice():
    assert charmlp.kernel_impl() == "fast" == charmlp.build_info()["kernel_impl"]
    charmlp.set_kernel_impl("naive")
    try:
        assert charmlp.kernel_impl() == "naive" == charmlp.build_info()["kernel_impl"]
    finally:
        charmlp.set_kernel_impl("fast")
    assert charmlp.kernel_impl() == "fast"


def test_bad_names_raise_and_change_nothing():
    for fn, name in ((charmlp.set_kernel_impl, "set_kernel_impl"), (charmlp.use_kernel_impl, "use_kernel_impl")):
        with pytest.raises(ValueError, match=rf"charmlp.{name}: name must be 'fast' or 'naive', got 'slow'"):
            fn("slow")
        with pytest.raises(TypeError, match=rf"charmlp.{name}: name must be a str, got int"):
            fn(1)
    with pytest.raises(ValueError, match="must be 'fast' or 'naive', got 'Naive'"):
        charmlp._C._set_kernel_impl("Naive")
    assert charmlp.kernel_impl() == "fast"


def test_use_kernel_impl_nests_and_restores_on_exceptions():
    with charmlp.use_kernel_impl("naive") as name:
        assert name == "naive" == charmlp.kernel_impl()
        with charmlp.use_kernel_impl("fast"):
            assert charmlp.kernel_impl() == "fast"
        assert charmlp.kernel_impl() == "naive"
    assert charmlp.kernel_impl() == "fast"
    with pytest.raises(KeyError):
        with charmlp.use_kernel_impl("naive"):
            raise KeyError("inside")
    assert charmlp.kernel_impl() == "fast"


def _lecture_inputs(B=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 27, (B, 3), generator=g)
    table = torch.randn(27, 10, generator=g)
    weight = torch.randn(200, 30, generator=g) / 30**0.5
    bias = torch.randn(200, generator=g)
    logits = 3 * torch.randn(B, 27, generator=g)
    target = torch.randint(0, 27, (B,), generator=g)
    return idx, table, weight, bias, logits, target


def test_the_switch_reaches_the_kernels():
    """The same results within rounding, from other code: the fast kernels' vectorized tanh
    and exp (vec_math.h) and their summation orders round differently from the naive loops'
    libm calls, so some outputs differ in their last bits."""
    idx, table, weight, bias, logits, target = _lecture_inputs()

    def run():
        out = P.embed_linear_tanh(idx, table, weight, bias)
        grads = P.embed_linear_tanh_backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)), out,
                                             idx, table, weight)
        return [out, *grads, *P.cross_entropy_and_grads(logits, target, 1, -100, 0.1)]

    fast = run()
    with charmlp.use_kernel_impl("naive"):
        naive = run()
    for f, n in zip(fast, naive):
        assert_close(n, f, rtol=1e-4, atol=1e-5)
    names = ["out", "grad_table", "grad_weight", "grad_bias", "loss", "lse", "grad_logits"]
    differ = {name for name, f, n in zip(names, fast, naive) if not torch.equal(f, n)}
    assert {"out", "grad_logits"} <= differ, differ


def test_ops_without_a_naive_version_ignore_the_switch():
    idx, table, weight, bias, _, target = _lecture_inputs(B=64)
    w2, b2 = torch.randn(27, 200) / 200**0.5, torch.zeros(27)
    h = torch.tanh(torch.randn(64, 200))

    def run():
        return [*P.linear_cross_entropy_and_grads(h, w2, b2, target, 1, -100, 0.0),
                *P.mlp_cross_entropy_and_grads(idx, target, table, weight, bias, w2, b2)]

    fast = run()
    with charmlp.use_kernel_impl("naive"):
        naive = run()
    for f, n in zip(fast, naive):
        assert torch.equal(f, n)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_class_weights_under_both(reduction, label_smoothing, dtype, kernel_impl):
    """weight= (the naive kernels weigh each row and class in the loop; the fast ones wrap
    unweighted rows in csrc/class_weight.h) with ignored rows, against F.cross_entropy."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(50, 7, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, 7, (50,), generator=g)
    target[::6] = -100
    w = (0.1 + torch.rand(7, generator=g, dtype=torch.float64)).to(dtype)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, weight=w)
    loss = ops.cross_entropy(logits, target, **kw)
    ref = reference.cross_entropy(logits, target, **kw)
    assert_close(loss, ref)
    grad_loss = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, logits, grad_loss)
    (ref_grad,) = torch.autograd.grad(ref, logits, grad_loss)
    assert_close(grad, ref_grad)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, target, **kw), (logits,))


def test_class_weighted_bad_target_raises_before_any_kernel(kernel_impl):
    logits = torch.randn(10, 7)
    target = torch.randint(0, 7, (10,))
    target[4] = 7
    with pytest.raises(IndexError, match=r"target contains 7 at flat position 4, outside the valid range \[0, 7\)"):
        ops.cross_entropy(logits, target, weight=torch.ones(7), label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_reduced_precision_accumulates_in_float(dtype):
    """float16 / bfloat16 in and out, float32 inside, as the fast kernels: both round the
    same float32 results once, so they agree to about one rounding of the dtype."""
    idx, table, weight, bias, logits, target = _lecture_inputs(B=64)
    args = [t.to(dtype) for t in (table, weight, bias)]
    x = logits.to(dtype)

    def run():
        out = P.embed_linear_tanh(idx, *args)
        return [out, *P.embed_linear_tanh_backward(torch.ones_like(out), out, idx, *args[:2]),
                *P.cross_entropy_and_grads(x, target, 1, -100, 0.1)]

    fast = run()
    with charmlp.use_kernel_impl("naive"):
        naive = run()
    for f, n in zip(fast, naive):
        assert n.dtype == f.dtype
        torch.testing.assert_close(n.float(), f.float(), rtol=2e-2, atol=2e-2)
