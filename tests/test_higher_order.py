"""Higher-order and forward-mode autograd through the charmlp ops: exact, or a clear error.

Double backward (create_graph=True) is supported by embed_linear_tanh, cross_entropy and
linear_cross_entropy in every reduction: with a graph to build, their backward is a
formula of ATen ops (csrc/autograd.cpp), checked here by gradgradcheck and against plain
PyTorch on a gradient penalty. mlp_cross_entropy computes its gradients in the forward and
raises. Forward-mode AD (jvp, jacfwd, forward_ad dual tensors) raises for every op.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import charmlp
from charmlp import ops, reference

REDUCTIONS = ["none", "mean", "sum"]


def _double(*shape, gen):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---- double backward ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,V,E,H", [(8, 3, 5, 2, 4), (1, 1, 3, 1, 2), (17, 4, 6, 3, 5)])
def test_embed_linear_tanh_gradgradcheck(gen, bias, B, T, V, E, H):
    idx = torch.randint(0, V, (B, T), generator=gen)
    table, weight = _double(V, E, gen=gen), _double(H, T * E, gen=gen)
    b = _double(H, gen=gen) if bias else None
    inputs = (table, weight, b) if bias else (table, weight)
    fn = (lambda t, w, bb: ops.embed_linear_tanh(idx, t, w, bb)) if bias else (
        lambda t, w: ops.embed_linear_tanh(idx, t, w, None))
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_embed_linear_tanh_gradient_penalty_matches_pytorch(gen):
    """The issue's example: a penalty on dL/dW must train table and W as plain PyTorch does."""
    idx = torch.randint(0, 5, (8, 3), generator=gen)
    idx32 = idx.to(torch.int32)
    results = []
    for fn, ids in ((ops.embed_linear_tanh, idx), (ops.embed_linear_tanh, idx32),
                    (reference.embed_linear_tanh, idx)):
        g2 = torch.Generator().manual_seed(1)
        tab, W, b = _double(5, 2, gen=g2), _double(4, 6, gen=g2), _double(4, gen=g2)
        g, = torch.autograd.grad(fn(ids, tab, W, b).sum(), W, create_graph=True)
        (g ** 2).sum().backward()
        results.append((tab.grad, W.grad, b.grad))
    for got in results[:2]:
        for a, e in zip(got, results[2]):
            assert e.abs().sum() > 0  # the penalty does reach every parameter
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_gradgradcheck(gen, reduction, label_smoothing):
    logits = _double(7, 5, gen=gen)
    target = torch.tensor([0, 1, -100, 3, 4, 2, 2])
    assert torch.autograd.gradgradcheck(
        lambda x: ops.cross_entropy(x, target, reduction, label_smoothing=label_smoothing), (logits,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_gradgradcheck(gen, reduction, label_smoothing, bias):
    h, w = _double(6, 3, gen=gen), _double(5, 3, gen=gen)
    b = _double(5, gen=gen) if bias else None
    target = torch.tensor([0, 1, -100, 3, 4, 2])
    if bias:
        fn, inputs = (lambda x, ww, bb: ops.linear_cross_entropy(
            x, ww, bb, target, reduction, label_smoothing=label_smoothing)), (h, w, b)
    else:
        fn, inputs = (lambda x, ww: ops.linear_cross_entropy(
            x, ww, None, target, reduction, label_smoothing=label_smoothing)), (h, w)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_gradient_penalty_matches_pytorch(gen, reduction):
    """A penalty on the input gradient of each loss (float32, the dtype people train in)."""
    target = torch.tensor([0, 1, -100, 3, 4, 2])
    base = [torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen)]

    def penalty(loss_fn):
        h, w, b = (t.clone().requires_grad_() for t in base)
        loss = loss_fn(h, w, b)
        loss = loss.sum() if reduction == "none" else loss
        gh, = torch.autograd.grad(loss, h, create_graph=True)
        (loss + (gh ** 2).sum()).backward()
        return h.grad, w.grad, b.grad

    ref = penalty(lambda h, w, b: reference.linear_cross_entropy(h, w, b, target, reduction=reduction,
                                                               label_smoothing=0.1))
    for got in (
        penalty(lambda h, w, b: ops.linear_cross_entropy(h, w, b, target, reduction, label_smoothing=0.1)),
        penalty(lambda h, w, b: ops.cross_entropy(F.linear(h, w, b), target, reduction, label_smoothing=0.1)),
    ):
        for a, e in zip(got, ref):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_mlp_cross_entropy_double_backward_raises(gen):
    idx, target = torch.randint(0, 5, (8, 3), generator=gen), torch.randint(0, 5, (8,), generator=gen)
    params = [_double(5, 2, gen=gen), _double(4, 6, gen=gen), _double(4, gen=gen), _double(5, 4, gen=gen),
              _double(5, gen=gen)]
    loss = ops.mlp_cross_entropy(idx, target, *params)
    with pytest.raises(RuntimeError, match="mlp_cross_entropy .*double backward"):
        torch.autograd.grad(loss, params[1], create_graph=True)


def test_first_order_backward_unchanged_by_retain_graph(gen):
    """The first-order fused backward is still the kernel's (equal to a second retained call)."""
    logits = torch.randn(9, 27, generator=gen, requires_grad=True)
    target = torch.randint(0, 27, (9,), generator=gen)
    loss = ops.cross_entropy(logits, target)
    g1, = torch.autograd.grad(loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(loss, logits)
    ref, = torch.autograd.grad(reference.cross_entropy(logits, target), logits)
    torch.testing.assert_close(g1, ref)
    torch.testing.assert_close(g2, ref)


# ---- forward-mode AD -------------------------------------------------------------


def _op_calls(gen):
    """(name, function of one float64 tensor, that tensor) for every differentiable op."""
    idx = torch.randint(0, 5, (8, 3), generator=gen)
    target = torch.tensor([0, 1, -100, 3, 4, 2, 2, 1])
    table, W1, b1 = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    W2, b2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    h = torch.randn(8, 4, dtype=torch.float64)
    calls = [("embed_linear_tanh", lambda t: ops.embed_linear_tanh(idx, t, W1, b1), table)]
    for red in REDUCTIONS:
        calls.append((f"cross_entropy-{red}", lambda x, red=red: ops.cross_entropy(x, target, red), h @ W2.T))
        calls.append((f"linear_cross_entropy-{red}",
                      lambda w, red=red: ops.linear_cross_entropy(h, w, b2, target, red), W2))
    calls.append(("mlp_cross_entropy", lambda w: ops.mlp_cross_entropy(idx, target, table, w, b1, W2, b2), W1))
    return calls


OP_CASES = ["embed_linear_tanh", "mlp_cross_entropy"] + [
    f"{op}-{red}" for op in ("cross_entropy", "linear_cross_entropy") for red in REDUCTIONS]


@pytest.mark.parametrize("name", OP_CASES)
def test_forward_ad_raises(gen, name):
    fn, x = {n: (f, t) for n, f, t in _op_calls(gen)}[name]
    op = name.split("-")[0]
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match=f"{op} does not support forward-mode AD"):
            fn(dual)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(fn)(x)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))


def test_forward_ad_raises_through_the_model(gen):
    m = charmlp.MLPLanguageModel(vocab_size=5, block_size=3, emb_dim=2, hidden=4, dtype=torch.float64)
    idx, y = torch.randint(0, 5, (8, 3), generator=gen), torch.randint(0, 5, (8,), generator=gen)
    params = {k: v.detach() for k, v in m.named_parameters()}
    for kw in ({"return_logits": False}, {}):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jacfwd(lambda p: torch.func.functional_call(m, p, (idx, y), kw)[1])(params)
