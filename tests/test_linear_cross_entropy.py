"""charmlp.ops.linear_cross_entropy against charmlp.reference.linear_cross_entropy
(F.cross_entropy(F.linear(...)))."""

from __future__ import annotations

import pytest
import torch

import charmlp
from charmlp import ops, reference
from conftest import assert_close

# (B, H, V): lecture size, tiny and odd sizes, V not a multiple of the GEMM column block (32 floats).
SHAPES = [(32, 200, 27), (1, 1, 2), (7, 3, 5), (65, 17, 16), (130, 33, 40), (4099, 200, 27), (3, 64, 100)]


def _inputs(B, H, V, dtype=torch.float32, bias=True, ignore_frac=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (B,), generator=g)
    t[torch.rand(B, generator=g) < ignore_frac] = -100
    return x, w, b, t


def _run(fn, x, w, b, t, **kw):
    loss = fn(x, w, b, t, **kw)
    params = [p for p in (x, w, b) if p is not None]
    grad_loss = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, params, grad_loss)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, reduction, bias, output_gemm):
    x, w, b, t = _inputs(*shape, bias=bias)
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t, reduction=reduction)
    ref, ref_grads = _run(reference.linear_cross_entropy, x, w, b, t, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        # Sums over thousands of rows in another order: absolute error grows with B.
        assert_close(got, want, rtol=1e-4, atol=1e-4)


# Word-level heads: the blocked ATen-GEMM path by default; (200, 8, 100_000) takes three
# row blocks (80 + 80 + 40 rows: ~8 M logits each), so blocks accumulate into dW and db.
@pytest.mark.parametrize("shape", [(70, 64, 5000), (200, 8, 100_000)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_word_level_heads_match_reference(shape, reduction):
    assert charmlp._C._get_output_gemm() == "auto"
    x, w, b, t = _inputs(*shape)
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t, reduction=reduction, label_smoothing=0.05)
    ref, ref_grads = _run(reference.linear_cross_entropy, x, w, b, t, reduction=reduction, label_smoothing=0.05)
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        # grad_input sums V = 100,000 float32 terms: both orders are ~1e-4 off.
        assert_close(got, want, rtol=1e-4, atol=2e-4)
    with torch.no_grad():
        assert_close(ops.linear_cross_entropy(x, w, b, t, reduction=reduction, label_smoothing=0.05),
                     ref.detach())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(4, 5), (2, 3, 4), (6,)], ids=str)
def test_leading_dimensions_are_flattened(reduction, lead):
    """[*, H] hidden states with [*] targets, as a sequence model calls its head."""
    x, w, b, t = _inputs(int(torch.tensor(lead).prod()), 12, 9)
    xs = x.detach().reshape(*lead, 12).requires_grad_()
    ts = t.reshape(lead)
    loss, grads = _run(ops.linear_cross_entropy, xs, w, b, ts, reduction=reduction)
    ref, ref_grads = _run(reference.linear_cross_entropy, xs, w, b, ts, reduction=reduction)
    assert loss.shape == (lead if reduction == "none" else ())
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want, rtol=1e-4, atol=1e-5)
    if len(lead) > 1:
        with pytest.raises(ValueError, match="leading shape"):
            ops.linear_cross_entropy(xs, w, b, t)


def test_output_gemm_switch_is_validated():
    with pytest.raises(ValueError, match="'auto', 'small' or 'aten'"):
        charmlp._C._set_output_gemm("mkl")
    assert charmlp._C._get_output_gemm() == "auto"


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_label_smoothing_and_ignore_index(label_smoothing, ignore_index, output_gemm):
    x, w, b, t = _inputs(50, 20, 9, ignore_frac=0.0)
    t[::4] = ignore_index
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t, **kw)
    ref, ref_grads = _run(reference.linear_cross_entropy, x, w, b, t, **kw)
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_all_ignored_and_empty(output_gemm):
    x, w, b, t = _inputs(5, 8, 6)
    t[:] = -100
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t)
    assert torch.isnan(loss) and torch.isnan(reference.linear_cross_entropy(x, w, b, t))
    assert all(g.abs().sum() == 0 for g in grads)
    x, w, b, t = _inputs(0, 8, 6)
    for red in ("mean", "sum", "none"):
        assert_close(ops.linear_cross_entropy(x, w, b, t, reduction=red),
                     reference.linear_cross_entropy(x, w, b, t, reduction=red), equal_nan=True)


def test_large_logits_are_stable(output_gemm):
    x, w, b, t = _inputs(32, 16, 27, ignore_frac=0.0)
    with torch.no_grad():
        x.mul_(1e3)  # logits of order 1e3-1e4
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t)
    ref, ref_grads = _run(reference.linear_cross_entropy, x, w, b, t)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close(loss, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    x, w, b, t = _inputs(40, 24, 27, dtype=dtype)
    loss, grads = _run(ops.linear_cross_entropy, x, w, b, t)
    up = [p.detach().double().requires_grad_() for p in (x, w, b)]
    ref, ref_grads = _run(reference.linear_cross_entropy, *up, t)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(loss, ref.to(dtype), dtype=dtype)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want.to(dtype), dtype=dtype)


def test_gradcheck_float64():
    x, w, b, t = _inputs(6, 4, 5, dtype=torch.float64, ignore_frac=0.3)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.linear_cross_entropy(x, w, b, t, label_smoothing=0.1), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.linear_cross_entropy(x, w, None, t, reduction="none"), (x, w))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    x, w, b, t = _inputs(20, 12, 27)
    op = torch.ops.charmlp.linear_cross_entropy.default
    torch.library.opcheck(op, (x, w, b, t, reduction, -100, 0.0))
    torch.library.opcheck(op, (x, w, None, t, reduction, -100, 0.2))
    loss, lse = op(x.detach(), w.detach(), b.detach(), t, reduction, -100, 0.0)
    torch.library.opcheck(
        torch.ops.charmlp.linear_cross_entropy_backward.default,
        (torch.ones_like(loss), x.detach(), w.detach(), b.detach(), t, lse, reduction, -100, 0.0),
    )


def test_torch_compile_fullgraph():
    x, w, b, t = _inputs(100, 32, 27)
    compiled = torch.compile(lambda x, w, b, t: ops.linear_cross_entropy(x, w, b, t), fullgraph=True)
    loss = compiled(x, w, b, t)
    grads = torch.autograd.grad(loss, (x, w, b))
    ref = reference.linear_cross_entropy(x, w, b, t)
    ref_grads = torch.autograd.grad(ref, (x, w, b))
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3000, 200, 27), (300, 64, 5000)], ids=["small-gemm", "aten-gemm"])
def test_deterministic_run_to_run(shape):
    x, w, b, t = _inputs(*shape)
    first = _run(ops.linear_cross_entropy, x, w, b, t)
    for _ in range(2):
        again = _run(ops.linear_cross_entropy, x, w, b, t)
        torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
        for g, f in zip(again[1], first[1]):
            torch.testing.assert_close(g, f, rtol=0, atol=0)


def test_bad_arguments_name_the_argument():
    x, w, b, t = _inputs(10, 8, 6)
    cases = [
        ((x, w[:, :-1], b, t), ValueError, r"weight must have shape \[V, H\] = \[V, 8\]"),
        ((x, w, b[:-1], t), ValueError, r"bias must have shape \[V\] = \[6\]"),
        ((x, w, b, t[:-1]), ValueError, r"target must have shape \[B\] = \[10\]"),
        ((x, w.double(), b, t), TypeError, "weight has dtype Double"),
        ((x[0], w, b, t), ValueError, "input must be 2-D"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.linear_cross_entropy(*args)
    t[2] = 6
    with pytest.raises(IndexError, match=r"target contains 6 .*\[0, 6\)"):
        ops.linear_cross_entropy(x, w, b, t)


# The autograd path of a scalar loss: linear_cross_entropy_and_grads computes the gradients
# in the forward, the backward scales them (the tests above, whose grad_loss is not 1, run it).

@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_and_grads_op_matches_reference_and_the_two_pass_backward(reduction, bias, label_smoothing):
    x, w, b, t = _inputs(300, 40, 27, bias=bias)
    P = torch.ops.charmlp
    loss, lse, *grads = P.linear_cross_entropy_and_grads(x.detach(), w.detach(), b.detach() if bias else None,
                                                         t, reduction, -100, label_smoothing)
    red = {1: "mean", 2: "sum"}[reduction]
    ref = reference.linear_cross_entropy(x, w, b, t, reduction=red, label_smoothing=label_smoothing)
    params = [p for p in (x, w, b) if p is not None]
    ref_grads = torch.autograd.grad(ref, params)
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The recompute backward (reduction 'none' uses it; so does the CUDA training step)
    # gives the same gradients from the forward's lse.
    _, lse2 = P.linear_cross_entropy(x.detach(), w.detach(), b.detach() if bias else None, t, reduction, -100,
                                     label_smoothing)
    torch.testing.assert_close(lse, lse2)
    two_pass = P.linear_cross_entropy_backward(torch.ones(()), x.detach(), w.detach(), b.detach() if bias else None,
                                               t, lse2, reduction, -100, label_smoothing)
    for got, want in zip(grads, two_pass):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_and_grads_needs_a_scalar_loss():
    x, w, b, t = _inputs(10, 8, 6)
    with pytest.raises(ValueError, match=r"reduction must be 1 \(mean\) or 2 \(sum\), got 0"):
        torch.ops.charmlp.linear_cross_entropy_and_grads(x.detach(), w.detach(), b.detach(), t, 0, -100, 0.0)


@pytest.mark.parametrize("reduction", [1, 2])
def test_and_grads_opcheck(reduction):
    x, w, b, t = _inputs(20, 12, 27)
    op = torch.ops.charmlp.linear_cross_entropy_and_grads.default
    torch.library.opcheck(op, (x.detach(), w.detach(), b.detach(), t, reduction, -100, 0.1))
    torch.library.opcheck(op, (x.detach(), w.detach(), None, t, reduction, -100, 0.0))


def test_scalar_loss_graph_building_backward_and_no_grad_records_nothing():
    # create_graph=True gives a differentiable gradient (gradgradcheck in test_higher_order.py)
    x, w, b, t = _inputs(10, 8, 6)
    loss = ops.linear_cross_entropy(x, w, b, t)
    grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    assert all(g.requires_grad for g in grads)
    for g, r in zip(grads, torch.autograd.grad(reference.linear_cross_entropy(x, w, b, t), (x, w, b))):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        assert ops.linear_cross_entropy(x, w, b, t).grad_fn is None


def test_only_inputs_that_require_grad_get_one():
    x, w, b, t = _inputs(30, 8, 6)
    x = x.detach()  # a frozen feature extractor
    loss = ops.linear_cross_entropy(x, w, b, t)
    gw, gb = torch.autograd.grad(loss, (w, b))
    rw, rb = torch.autograd.grad(reference.linear_cross_entropy(x, w, b, t), (w, b))
    assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    assert_close(gb, rb, rtol=1e-4, atol=1e-5)


def test_retained_graph_backward_twice_after_in_place_grad_changes():
    x, w, b, t = _inputs(64, 16, 27)
    loss = ops.linear_cross_entropy(x, w, b, t)
    loss.backward(retain_graph=True)
    want = torch.autograd.grad(reference.linear_cross_entropy(x, w, b, t), (x, w, b))
    for p, g in zip((x, w, b), want):
        assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
        p.grad.zero_()
    loss.backward()
    for p, g in zip((x, w, b), want):
        assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
