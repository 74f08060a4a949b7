"""The F.cross_entropy options a drop-in loss must honour: class weights (weight= /
class_weight=), [*, V] and [*, H] inputs, and what it cannot do (probability targets, a
gradient for the weights) raising rather than returning a wrong number.

Ground truth: charmlp.reference (F.cross_entropy, after F.linear for the fused head) in
float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import charmlp
from charmlp import ops, reference

REDUCTIONS = ["none", "mean", "sum"]


def _case(B, V, H=None, dtype=torch.float64, seed=0, ignored=0.2, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (B,), generator=g)
    target[torch.rand(B, generator=g) < ignored] = ignore_index
    weight = (0.1 + 2 * torch.rand(V, generator=g, dtype=torch.float64)).to(dtype)
    if H is None:
        return (3 * torch.randn(B, V, generator=g, dtype=torch.float64)).to(dtype), target, weight
    x = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    return x, W, b, target, weight


def _grads(loss, inputs):
    g = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(loss, inputs, g)


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


# ---------------------------------------------------------------------------------------
# class weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(1, 2), (37, 27), (300, 1000)], ids=str)
def test_cross_entropy_class_weights_match_pytorch(shape, dtype, reduction, label_smoothing):
    logits, target, weight = _case(*shape, dtype=dtype)
    x_ref = logits.double().requires_grad_()
    x = logits.clone().requires_grad_()
    want = reference.cross_entropy(x_ref, target, weight=weight.double(), reduction=reduction,
                                   label_smoothing=label_smoothing)
    got = ops.cross_entropy(x, target, reduction, -100, label_smoothing, weight=weight)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **_tol(dtype))
    (gw,), (gg,) = _grads(want, x_ref), _grads(got.double(), x)
    torch.testing.assert_close(gg.double(), gw, **_tol(dtype))
    with torch.no_grad():  # the loss-only kernel
        torch.testing.assert_close(ops.cross_entropy(logits, target, reduction, -100, label_smoothing,
                                                     weight=weight).double(), want.detach(), **_tol(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("output_gemm", ["small", "aten"], indirect=True)
@pytest.mark.parametrize("shape", [(1, 2, 3), (45, 27, 20), (130, 700, 16)], ids=str)
def test_linear_cross_entropy_class_weights_match_pytorch(shape, output_gemm, with_bias, reduction,
                                                          label_smoothing):
    B, V, H = shape
    x, W, b, target, weight = _case(B, V, H)
    b = b if with_bias else None
    inputs = [t.clone().requires_grad_() for t in (x, W) + ((b,) if with_bias else ())]
    refs = [t.clone().requires_grad_() for t in inputs]
    want = reference.linear_cross_entropy(refs[0], refs[1], refs[2] if with_bias else None, target,
                                          class_weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    got = ops.linear_cross_entropy(inputs[0], inputs[1], inputs[2] if with_bias else None, target, reduction,
                                   -100, label_smoothing, class_weight=weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, a, e in zip(["input", "weight", "bias"], _grads(got, inputs), _grads(want, refs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_cross_entropy(x, W, b, target, reduction, -100, label_smoothing,
                                                            class_weight=weight), want.detach())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weights_with_ignore_index_inside_the_vocabulary(reduction):
    logits, target, weight = _case(40, 9, ignored=0.3, ignore_index=3)
    x = logits.clone().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    want = reference.cross_entropy(x_ref, target, weight=weight, ignore_index=3, reduction=reduction,
                                   label_smoothing=0.1)
    got = ops.cross_entropy(x, target, reduction, 3, 0.1, weight=weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grads(got, x)[0], _grads(want, x_ref)[0])


def test_all_ignored_weighted_mean_is_nan_like_pytorch_with_zero_gradients():
    logits, target, weight = _case(6, 5, ignored=1.0)
    x = logits.clone().requires_grad_()
    loss = ops.cross_entropy(x, target, weight=weight)
    assert torch.isnan(loss) and torch.isnan(reference.cross_entropy(logits, target, weight=weight))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_weighted_losses_gradcheck_and_gradgradcheck(reduction, label_smoothing):
    logits, target, weight = _case(7, 5, ignored=0.3)
    x = logits.clone().requires_grad_()
    fn = lambda x: ops.cross_entropy(x, target, reduction, -100, label_smoothing, weight=weight)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    h, W, b, target, weight = _case(6, 5, H=3)
    args = [t.clone().requires_grad_() for t in (h, W, b)]
    lfn = lambda h, W, b: ops.linear_cross_entropy(  # noqa: E731
        h, W, b, target, reduction, -100, label_smoothing, class_weight=weight)
    assert gradcheck(lfn, args)
    assert gradgradcheck(lfn, args)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_weighted_ops_pass_opcheck(reduction):
    logits, target, weight = _case(9, 6, dtype=torch.float32)
    op = torch.ops.charmlp
    torch.library.opcheck(op.cross_entropy.default, (logits.requires_grad_(), target, reduction, -100, 0.1, weight))
    h, W, b, target, weight = _case(9, 6, H=4, dtype=torch.float32)
    torch.library.opcheck(op.linear_cross_entropy.default,
                          (h.requires_grad_(), W.requires_grad_(), b, target, reduction, -100, 0.1, weight))
    _, lse = op.cross_entropy(logits.detach(), target, reduction, -100, 0.1, weight)
    grad_loss = torch.ones(9) if reduction == 0 else torch.tensor(1.0)
    torch.library.opcheck(op.cross_entropy_backward.default,
                          (grad_loss, logits.detach(), target, lse, reduction, -100, 0.1, weight))
    if reduction:
        torch.library.opcheck(op.cross_entropy_and_grads.default, (logits.detach(), target, reduction, -100, 0.1,
                                                                    weight))
        torch.library.opcheck(op.linear_cross_entropy_and_grads.default,
                              (h.detach(), W.detach(), b, target, reduction, -100, 0.1, weight))


def test_weighted_losses_compile_fullgraph():
    logits, target, weight = _case(16, 11, dtype=torch.float32)
    h, W, b, t2, w2 = _case(16, 11, H=5, dtype=torch.float32)

    def f(logits, h, W, b):
        return (ops.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
                + ops.linear_cross_entropy(h, W, b, t2, class_weight=w2))

    args = [t.clone().requires_grad_() for t in (logits, h, W, b)]
    ref_args = [t.clone().requires_grad_() for t in (logits, h, W, b)]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*ref_args)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, e in zip(args, ref_args):
        torch.testing.assert_close(a.grad, e.grad)


def test_a_weight_that_requires_grad_raises():
    logits, target, weight = _case(5, 4, dtype=torch.float32)
    w = weight.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="no gradient with respect to its class weights"):
        ops.cross_entropy(logits.requires_grad_(), target, weight=w)
    h, W, b, target, weight = _case(5, 4, H=3, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="no gradient with respect to its class weights"):
        ops.linear_cross_entropy(h, W.requires_grad_(), b, target, class_weight=weight.requires_grad_())
    with torch.no_grad():  # no graph: nothing could be silently missing
        ops.cross_entropy(logits, target, weight=w)


@pytest.mark.parametrize(
    "bad, match",
    [(torch.ones(5), r"weight \(the class weights\) must have shape \[V\] = \[4\], got \[5\]"),
     (torch.ones(4, 1), r"must have shape \[V\] = \[4\]"),
     (torch.ones(4, dtype=torch.long), "weight must be a floating-point tensor")],
)
def test_bad_class_weights_name_the_argument(bad, match):
    logits, target, _ = _case(5, 4, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.cross_entropy(logits, target, weight=bad)
    h, W, b, target, _ = _case(5, 4, H=3, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.linear_cross_entropy(h, W, b, target, class_weight=bad)


def test_bad_targets_still_raise_with_class_weights():
    logits, target, weight = _case(5, 4, dtype=torch.float32)
    target[2] = 4
    with pytest.raises(IndexError, match="target"):
        ops.cross_entropy(logits, target, weight=weight)
    with pytest.raises(IndexError, match="target"):
        ops.cross_entropy(logits.requires_grad_(), target, weight=weight, label_smoothing=0.1)


def test_modules_take_class_weights_like_nn_cross_entropy_loss():
    logits, target, weight = _case(30, 8, dtype=torch.float32)
    crit = charmlp.CrossEntropyLoss(weight, reduction="sum", label_smoothing=0.1)
    want = reference.cross_entropy(logits, target, weight=weight, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(crit(logits, target), want)
    assert "weight" in crit.state_dict()
    with pytest.raises(TypeError, match="pass reduction= by keyword"):
        charmlp.CrossEntropyLoss("sum")
    h, W, b, target, weight = _case(30, 8, H=6, dtype=torch.float32)
    head = charmlp.LinearCrossEntropyLoss(6, 8, class_weight=weight, label_smoothing=0.05)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    want = reference.linear_cross_entropy(h, W, b, target, class_weight=weight, label_smoothing=0.05)
    torch.testing.assert_close(head(h, target), want)
    assert "class_weight" in head.state_dict()
    with pytest.raises(ValueError, match=r"class_weight must have shape \[num_classes\] = \[8\]"):
        charmlp.LinearCrossEntropyLoss(6, 8, class_weight=torch.ones(7))


# ---------------------------------------------------------------------------------------
# [*, V] / [*, H] inputs, and what the ops cannot do
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_takes_leading_dimensions(reduction):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 11, generator=g, dtype=torch.float64)
    target = torch.randint(0, 11, (4, 5), generator=g)
    target[0, 1] = -100
    x, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = ops.cross_entropy(x, target, reduction)
    want = reference.cross_entropy(x_ref, target, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grads(got, x)[0], _grads(want, x_ref)[0])
    with pytest.raises(ValueError, match=r"target must have logits's leading shape \(4, 5\)"):
        ops.cross_entropy(logits, target.reshape(-1))


def test_probability_targets_raise_not_implemented():
    logits = torch.randn(3, 4)
    probs = torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(NotImplementedError, match="probability targets"):
        ops.cross_entropy(logits, probs)
    with pytest.raises(NotImplementedError, match="probability targets"):
        ops.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), None, probs)
    with pytest.raises(NotImplementedError, match="probability targets"):
        charmlp.CrossEntropyLoss()(logits, probs)


# ---------------------------------------------------------------------------------------
# autocast: each op follows what autocast does to the PyTorch code it replaces
# ---------------------------------------------------------------------------------------

BF16 = {"rtol": 2e-2, "atol": 2e-2}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("V", [27, 2000])
def test_linear_cross_entropy_under_cpu_autocast(V, reduction):
    x, W, b, target, weight = _case(48, V, H=32, dtype=torch.float32)
    ours, ref = _leaves(x, W, b), _leaves(x, W, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(*ours, target, reduction, label_smoothing=0.1, class_weight=weight)
        want = reference.linear_cross_entropy(*ref, target, reduction=reduction, label_smoothing=0.1,
                                              class_weight=weight)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **BF16)
    g = torch.rand(got.shape, generator=torch.Generator().manual_seed(2))
    for name, a, e in zip(["input", "weight", "bias"], torch.autograd.grad(got, ours, g), torch.autograd.grad(want, ref, g)):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-3 * e.abs().max().item(), msg=lambda m: f"{name}: {m}")
    # The low-precision rounding really happens: not the float32 result.
    exact = ops.linear_cross_entropy(x, W, b, target, reduction, label_smoothing=0.1, class_weight=weight)
    assert not torch.equal(got.detach(), exact)


def test_cross_entropy_under_cpu_autocast_runs_in_float32():
    logits, target, weight = _case(40, 30, dtype=torch.float32)
    low = logits.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.cross_entropy(low, target, weight=weight)
        want = reference.cross_entropy(low, target, weight=weight)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_embed_linear_tanh_under_cpu_autocast():
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 27, (64, 3), generator=g)
    C, W, b = torch.randn(27, 10, generator=g), torch.randn(200, 30, generator=g) / 30**0.5, torch.randn(200, generator=g)
    ours, ref = _leaves(C, W, b), _leaves(C, W, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.embed_linear_tanh(idx, *ours)
        want = reference.embed_linear_tanh(idx, *ref)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **BF16)
    gout = torch.randn(got.shape, generator=g)
    for name, a, e in zip(["table", "weight", "bias"], torch.autograd.grad(got, ours, gout.bfloat16()),
                          torch.autograd.grad(want, ref, gout.bfloat16())):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-2 * e.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_autocast_leaves_float64_alone_and_modules_follow_it():
    x, W, b, target, weight = _case(20, 9, H=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(x, W, b, target)
        head = charmlp.LinearCrossEntropyLoss(5, 9)
        head_loss = head(x.float(), target)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference.linear_cross_entropy(x, W, b, target))
    assert head_loss.dtype == torch.float32


def test_autocast_under_torch_compile():
    x, W, b, target, _ = _case(32, 27, H=16, dtype=torch.float32)

    def f(x, W, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.linear_cross_entropy(x, W, b, target)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, W, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, f(x, W, b))
