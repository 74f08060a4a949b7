"""charmlp.ops.cross_entropy against charmlp.reference.cross_entropy (F.cross_entropy)."""

from __future__ import annotations

import math

import pytest
import torch

from charmlp import ops, reference
from conftest import assert_close

# Every test runs against the fast kernels and the naive ones (charmlp.set_kernel_impl).
pytestmark = pytest.mark.usefixtures("kernel_impl")

SHAPES = [(1, 2), (7, 3), (32, 27), (4099, 27), (64, 1000), (3, 5)]


def _inputs(B, V, dtype=torch.float32, scale=3.0, ignore_frac=0.0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, V, (B,), generator=g)
    if ignore_frac:
        target[torch.rand(B, generator=g) < ignore_frac] = ignore_index
    return logits, target


def _loss_and_grad(fn, logits, target, **kw):
    loss = fn(logits, target, **kw)
    grad_loss = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, logits, grad_loss)
    return loss, grad


def _compare(logits, target, **kw):
    loss, grad = _loss_and_grad(ops.cross_entropy, logits, target, **kw)
    ref, ref_grad = _loss_and_grad(reference.cross_entropy, logits, target, **kw)
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    assert_close(loss, ref, equal_nan=True)
    assert_close(grad, ref_grad, equal_nan=True)
    return loss, grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_matches_reference(shape, reduction, label_smoothing):
    logits, target = _inputs(*shape, ignore_frac=0.2)
    _compare(logits, target, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4, -1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index(ignore_index, reduction):
    logits, target = _inputs(50, 5, ignore_frac=0.3, ignore_index=ignore_index)
    _compare(logits, target, reduction=reduction, ignore_index=ignore_index, label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ignored_batch(reduction, label_smoothing):
    logits, target = _inputs(6, 4)
    target[:] = -100
    loss, grad = _compare(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "mean":
        assert math.isnan(loss.item())  # 0 / 0, as PyTorch
    assert grad.abs().sum() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    logits, target = _inputs(0, 27)
    loss = ops.cross_entropy(logits, target, reduction=reduction)
    ref = reference.cross_entropy(logits, target, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref, equal_nan=True)


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_large_logits_are_stable(scale, label_smoothing):
    logits, target = _inputs(64, 27, scale=1.0)
    with torch.no_grad():
        logits.copy_(torch.sign(logits) * scale)  # entries are exactly +-scale
    loss, grad = _compare(logits, target, reduction="mean", label_smoothing=label_smoothing)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # The naive softmax overflows here; make sure the test is meaningful.
    if scale >= 1e2:
        assert not torch.isfinite(logits.detach().exp().sum(1)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    logits, target = _inputs(40, 27, dtype=dtype)
    loss, grad = _loss_and_grad(ops.cross_entropy, logits, target)
    up = logits.detach().double().requires_grad_()
    ref, ref_grad = _loss_and_grad(reference.cross_entropy, up, target)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, ref.to(dtype), dtype=dtype)
    assert_close(grad, ref_grad.to(dtype), dtype=dtype)


def test_lse_is_saved_in_float32_for_bfloat16():
    logits, target = _inputs(10, 27, dtype=torch.bfloat16)
    _, lse = torch.ops.charmlp.cross_entropy(logits, target, 1, -100, 0.0)
    assert lse.dtype == torch.float32
    assert_close(lse, torch.logsumexp(logits.detach().float(), 1))


def test_int32_targets():
    logits, target = _inputs(30, 27)
    assert_close(ops.cross_entropy(logits, target.int()), reference.cross_entropy(logits, target))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_gradcheck_float64(reduction, label_smoothing):
    logits, target = _inputs(6, 5, dtype=torch.float64, ignore_frac=0.3)
    assert torch.autograd.gradcheck(
        lambda x: ops.cross_entropy(x, target, reduction=reduction, label_smoothing=label_smoothing), (logits,)
    )


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    logits, target = _inputs(9, 27, ignore_frac=0.3)
    torch.library.opcheck(torch.ops.charmlp.cross_entropy.default, (logits, target, reduction, -100, 0.1))
    loss, lse = torch.ops.charmlp.cross_entropy(logits.detach(), target, reduction, -100, 0.1)
    torch.library.opcheck(
        torch.ops.charmlp.cross_entropy_backward.default,
        (torch.ones_like(loss), logits.detach(), target, lse, reduction, -100, 0.1),
    )


def test_torch_compile_fullgraph():
    logits, target = _inputs(128, 27, ignore_frac=0.1)
    compiled = torch.compile(lambda x, t: ops.cross_entropy(x, t, label_smoothing=0.1), fullgraph=True)
    loss = compiled(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = reference.cross_entropy(logits, target, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert_close(loss, ref)
    assert_close(grad, ref_grad)


def test_non_contiguous_inputs():
    base = torch.randn(40, 60)
    logits = base[3:33:2, 5:32]   # [15, 27], strided and offset
    target = torch.randint(0, 27, (30,))[::2]
    assert_close(ops.cross_entropy(logits, target, reduction="none"),
                 reference.cross_entropy(logits, target, reduction="none"))


@pytest.mark.parametrize("bad", [27, -1, -101, 10**9])
def test_out_of_range_target_raises(bad):
    logits, target = _inputs(10, 27)
    target[4] = bad
    with pytest.raises(IndexError, match=rf"target contains {bad} .*\[0, 27\)"):
        ops.cross_entropy(logits, target)


def test_bad_arguments_name_the_argument():
    logits, target = _inputs(10, 27)
    cases = [
        ((logits[0], target), {}, ValueError, "logits must be 2-D"),
        ((logits, target[:-1]), {}, ValueError, r"target must have shape \[B\] = \[10\]"),
        ((logits, target.float()), {}, NotImplementedError, "probability targets"),
        ((logits.long(), target), {}, TypeError, "logits must be a floating-point tensor"),
        ((logits, target), {"reduction": "avg"}, ValueError, "reduction must be 'none', 'mean' or 'sum', got 'avg'"),
        ((logits, target), {"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.cross_entropy(*args, **kw)


# The autograd path of a scalar loss: cross_entropy_and_grads computes the gradient in the
# forward, the backward scales it (the tests above, whose grad_loss is not 1, run it).

@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_and_grads_op_matches_reference_and_the_two_pass_backward(reduction, label_smoothing, dtype):
    logits, target = _inputs(300, 27, dtype=dtype, ignore_frac=0.2)
    P = torch.ops.charmlp
    loss, lse, grad = P.cross_entropy_and_grads(logits.detach(), target, reduction, -100, label_smoothing)
    up = logits.detach().double().requires_grad_()
    ref = reference.cross_entropy(up, target, reduction={1: "mean", 2: "sum"}[reduction],
                                  label_smoothing=label_smoothing)
    (ref_grad,) = torch.autograd.grad(ref, up)
    assert loss.dtype == dtype and grad.dtype == dtype and lse.dtype == torch.float32
    assert_close(loss, ref.to(dtype), dtype=dtype)
    assert_close(grad, ref_grad.to(dtype), dtype=dtype)
    _, lse2 = P.cross_entropy(logits.detach(), target, reduction, -100, label_smoothing)
    torch.testing.assert_close(lse, lse2)
    two_pass = P.cross_entropy_backward(torch.ones((), dtype=dtype), logits.detach(), target, lse2, reduction, -100,
                                        label_smoothing)
    assert_close(grad, two_pass, dtype=dtype)


def test_and_grads_needs_a_scalar_loss_and_passes_opcheck():
    logits, target = _inputs(20, 27)
    op = torch.ops.charmlp.cross_entropy_and_grads.default
    with pytest.raises(ValueError, match=r"reduction must be 1 \(mean\) or 2 \(sum\), got 0"):
        op(logits.detach(), target, 0, -100, 0.0)
    for reduction in (1, 2):
        torch.library.opcheck(op, (logits.detach(), target, reduction, -100, 0.1))


def test_scalar_loss_graph_building_backward_and_no_grad_records_nothing():
    # create_graph=True gives a differentiable gradient (gradgradcheck in test_higher_order.py)
    logits, target = _inputs(10, 6)
    loss = ops.cross_entropy(logits, target)
    grads = torch.autograd.grad(loss, logits, create_graph=True)
    assert all(g.requires_grad for g in grads)
    for g, r in zip(grads, torch.autograd.grad(reference.cross_entropy(logits, target), (logits,))):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        assert ops.cross_entropy(logits, target).grad_fn is None


def test_retained_graph_backward_twice_after_in_place_grad_changes():
    logits, target = _inputs(64, 27)
    loss = ops.cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    (want,) = torch.autograd.grad(reference.cross_entropy(logits, target), logits)
    assert_close(logits.grad, want)
    logits.grad.zero_()
    loss.backward()
    assert_close(logits.grad, want)


@pytest.mark.parametrize("V", [2, 27, 1000])
def test_lse_is_accurate_over_the_range_of_sums_and_propagates_nan(V):
    """The forward takes the rows' logs together with a vectorized log (vec_math.h): its
    error is a few float32 ulp over every sum of exps from 1 (one dominant logit) to V."""
    g = torch.Generator().manual_seed(V)
    spread = torch.logspace(-3, 2, 64).unsqueeze(1)  # from nearly equal logits to one dominant
    logits = torch.randn(64, V, generator=g, dtype=torch.float64) * spread
    target = torch.randint(0, V, (64,), generator=g)
    logits[5, 0] = float("nan")
    loss, lse = torch.ops.charmlp.cross_entropy(logits.float(), target, 0, -100, 0.0)
    ref_lse = torch.logsumexp(logits.float().double(), dim=1)
    assert torch.isnan(lse[5]) and torch.isnan(loss[5])
    keep = torch.arange(64) != 5
    torch.testing.assert_close(lse[keep].double(), ref_lse[keep], rtol=1e-6, atol=1e-6)
    ref_loss = reference.cross_entropy(logits.float().double(), target, reduction="none")
    torch.testing.assert_close(loss[keep].double(), ref_loss[keep], rtol=1e-5, atol=1e-5)
