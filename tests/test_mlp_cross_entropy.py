"""charmlp.ops.mlp_cross_entropy: the whole model's loss as one op == plain PyTorch.

The op's forward computes the loss and, when a parameter needs a gradient, all five
gradients (mlp_cross_entropy_and_grads); its backward scales them. Every test compares
the loss and the gradients with autograd through charmlp.reference (plain PyTorch).
"""

from __future__ import annotations

import pytest
import torch

import charmlp
from charmlp import ops, reference
from conftest import assert_close

P = torch.ops.charmlp

# (B, T, V, E, H)
SHAPES = [(32, 3, 27, 10, 200), (1, 1, 2, 1, 1), (7, 2, 5, 3, 9), (100, 8, 27, 64, 33), (5000, 3, 27, 10, 200),
          (64, 4, 40, 5, 17), (40, 10, 6, 2, 20), (130, 3, 27, 10, 70)]
# Batches that repeat contexts, so the CPU kernel runs once per distinct context
# (see test_mlp_sgd_step.py): (B, T, V, E, H, distinct contexts drawn from).
REPEATED = [(3000, 2, 6, 3, 20, 36), (4000, 3, 5, 4, 33, 125), (20000, 3, 27, 10, 200, 300)]


def _params(T, V, E, H, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(V, E), (H, T * E), (H,), (V, H), (V,)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(requires_grad)
            for s in shapes]


def _batch(B, T, V, seed, contexts=None):
    g = torch.Generator().manual_seed(seed)
    if contexts is None:
        idx = torch.randint(0, V, (B, T), generator=g)
    else:
        pool = torch.randint(0, V, (contexts, T), generator=g)
        idx = pool[torch.randint(0, contexts, (B,), generator=g)]
    return idx, torch.randint(0, V, (B,), generator=g)


def charmlp_loss_and_grads(idx, target, params):
    loss = ops.mlp_cross_entropy(idx, target, *params)
    return loss.detach(), list(torch.autograd.grad(loss, params))


def _check(got_loss, got_grads, want_loss, want_grads, dtype):
    assert got_loss.shape == () and got_loss.dtype == dtype
    assert_close(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(shape, dtype, embed_algorithm):
    B, T, V, E, H = shape
    idx, target = _batch(B, T, V, seed=B)
    params = _params(T, V, E, H, dtype)
    want = reference.mlp_loss_and_grads(idx, target, params)
    _check(*charmlp_loss_and_grads(idx, target, params), *want, dtype)
    with torch.no_grad():  # the loss-only kernel
        assert_close(ops.mlp_cross_entropy(idx, target, *params), want[0])


@pytest.mark.parametrize("shape", REPEATED, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_repeated_contexts_match_reference(shape, dtype, embed_algorithm, context_grouping):
    B, T, V, E, H, contexts = shape
    idx, target = _batch(B, T, V, seed=contexts, contexts=contexts)
    target[::5] = -100
    params = _params(T, V, E, H, dtype)
    want = reference.mlp_loss_and_grads(idx, target, params)
    # The grouped kernel sums each context's rows before the rest of the backward:
    # float32 rounding differs from the row-by-row reference by ~1e-5 relative.
    _check(*charmlp_loss_and_grads(idx, target, params), *want, dtype)
    with torch.no_grad():
        assert_close(ops.mlp_cross_entropy(idx, target, *params), want[0])


def test_and_grads_op_returns_loss_and_all_gradients():
    idx, target = _batch(50, 3, 27, seed=3)
    params = _params(3, 27, 10, 40, requires_grad=False)
    loss, *grads = P.mlp_cross_entropy_and_grads.default(idx, target, *params)
    _check(loss, grads, *reference.mlp_loss_and_grads(idx, target, params), torch.float32)


def test_backward_scales_by_the_incoming_gradient():
    idx, target = _batch(40, 3, 27, seed=4)
    params = _params(3, 27, 10, 30)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    (3.0 * loss).backward(retain_graph=True)
    (-0.5 * loss).backward()  # accumulates: 2.5x the gradient in all
    _, want = reference.mlp_loss_and_grads(idx, target, params)
    for p, w in zip(params, want):
        assert_close(p.grad, 2.5 * w)


def test_retained_graph_backward_twice_after_in_place_grad_changes():
    """loss.backward() (a seed of 1) hands the saved gradients to autograd as they are:
    a retained graph must still give the right gradients after .grad was changed in place."""
    idx, target = _batch(40, 3, 27, seed=18)
    params = _params(3, 27, 10, 30)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    loss.backward(retain_graph=True)
    _, want = reference.mlp_loss_and_grads(idx, target, params)
    for p, w in zip(params, want):
        assert_close(p.grad, w)
        p.grad.zero_()  # optimizer.zero_grad(set_to_none=False)
    loss.backward()
    for p, w in zip(params, want):
        assert_close(p.grad, w)


def test_returned_gradients_alias_nothing_autograd_keeps():
    """torch.autograd.grad hands out the forward's gradients; changing them in place must
    not change what a second backward through the retained graph returns (recomputed)."""
    idx, target = _batch(40, 3, 27, seed=19)
    params = _params(3, 27, 10, 30)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    first = torch.autograd.grad(loss, params, retain_graph=True)
    _, want = reference.mlp_loss_and_grads(idx, target, params)
    for g, w in zip(first, want):
        assert_close(g, w)
        g.mul_(0)
    second = torch.autograd.grad(2.0 * loss, params, retain_graph=True)
    for g, w in zip(second, want):
        assert_close(g, 2.0 * w)
    # The recompute reads the parameters saved by the forward: an in-place change since
    # then is an error, as for any op that saves its inputs.
    with torch.no_grad():
        params[3].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, params)


def test_only_parameters_that_require_grad_get_one():
    idx, target = _batch(40, 3, 27, seed=5)
    params = _params(3, 27, 10, 30)
    params[0].requires_grad_(False)  # a frozen embedding table
    ops.mlp_cross_entropy(idx, target, *params).backward()
    assert params[0].grad is None
    _, want = reference.mlp_loss_and_grads(idx, target, params)
    for p, w in zip(params[1:], want[1:]):
        assert_close(p.grad, w)


def test_without_grad_nothing_is_recorded():
    idx, target = _batch(40, 3, 27, seed=6)
    params = _params(3, 27, 10, 30, requires_grad=False)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    assert not loss.requires_grad and loss.grad_fn is None
    with torch.no_grad():
        loss = ops.mlp_cross_entropy(idx, target, *_params(3, 27, 10, 30))
    assert not loss.requires_grad


def test_ignored_targets_and_all_ignored():
    idx, target = _batch(30, 3, 27, seed=7)
    target[::3] = -100
    params = _params(3, 27, 10, 20)
    _check(*charmlp_loss_and_grads(idx, target, params), *reference.mlp_loss_and_grads(idx, target, params),
           torch.float32)
    target[:] = -100
    loss, grads = charmlp_loss_and_grads(idx, target, params)
    ref_loss, ref_grads = reference.mlp_loss_and_grads(idx, target, params)
    assert torch.isnan(loss) and torch.isnan(ref_loss)  # the mean over no rows
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # all zero
    with torch.no_grad():
        assert torch.isnan(ops.mlp_cross_entropy(idx, target, *params))


@pytest.mark.parametrize("V", [27, 0], ids=["V27", "empty-vocab"])
def test_empty_batch_is_a_nan_loss_and_zero_gradients(V):
    params = _params(3, V, 10, 20)
    idx, target = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    loss, grads = charmlp_loss_and_grads(idx, target, params)
    assert torch.isnan(loss)
    for g, p in zip(grads, params):
        assert g.shape == p.shape and not g.any()


def test_int32_indices_and_non_contiguous_parameters():
    idx, target = _batch(64, 3, 27, seed=8)
    params = _params(3, 27, 10, 20)
    want = reference.mlp_loss_and_grads(idx, target, params)
    # weight1 and weight2 as transposed views of other storage.
    w1 = params[1].detach().T.contiguous().T.requires_grad_()
    w2 = params[3].detach().T.contiguous().T.requires_grad_()
    views = [params[0], w1, params[2], w2, params[4]]
    assert not w1.is_contiguous() and not w2.is_contiguous()
    _check(*charmlp_loss_and_grads(idx.int(), target.int(), views), *want, torch.float32)


def test_deterministic_run_to_run(embed_algorithm):
    idx, target = _batch(8000, 3, 27, seed=9)
    params = _params(3, 27, 10, 200)
    first = charmlp_loss_and_grads(idx, target, params)
    for _ in range(2):
        again = charmlp_loss_and_grads(idx, target, params)
        for a, b in zip([first[0]] + first[1], [again[0]] + again[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_matches_the_fused_sgd_step():
    """The gradients are those mlp_sgd_step applies (one loop serves both)."""
    idx, target = _batch(3000, 3, 27, seed=10, contexts=200)
    params = _params(3, 27, 10, 50)
    loss, grads = charmlp_loss_and_grads(idx, target, params)
    stepped = [p.detach().clone() for p in params]
    step_loss = ops.mlp_sgd_step(idx, target, *stepped, 1.0)
    torch.testing.assert_close(step_loss, loss, rtol=0, atol=0)
    for p, s, g in zip(params, stepped, grads):
        torch.testing.assert_close(s, p.detach() - g, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 2, 5, 3, 4), (9, 3, 7, 2, 6), (300, 2, 4, 3, 5)], ids=str)
def test_gradcheck_float64(shape, embed_algorithm):
    B, T, V, E, H = shape  # the last one repeats contexts: the grouped kernel
    idx, target = _batch(B, T, V, seed=11)
    target[1] = -100
    params = _params(T, V, E, H, torch.float64)
    assert torch.autograd.gradcheck(lambda *p: ops.mlp_cross_entropy(idx, target, *p), params)


def test_double_backward_raises():
    idx, target = _batch(10, 3, 27, seed=12)
    params = _params(3, 27, 10, 20)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, params, create_graph=True)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
def test_opcheck(requires_grad):
    idx, target = _batch(12, 3, 27, seed=13)
    params = _params(3, 27, 10, 20, requires_grad=requires_grad)
    torch.library.opcheck(P.mlp_cross_entropy.default, (idx, target, *params))
    torch.library.opcheck(P.mlp_cross_entropy_and_grads.default, (idx, target, *[p.detach() for p in params]))


def test_torch_compile_fullgraph():
    idx, target = _batch(64, 3, 27, seed=14)
    params = _params(3, 27, 10, 20)
    want = reference.mlp_loss_and_grads(idx, target, params)
    compiled = torch.compile(lambda i, t, *p: ops.mlp_cross_entropy(i, t, *p), fullgraph=True)
    loss = compiled(idx, target, *params)
    _check(loss.detach(), list(torch.autograd.grad(loss, params)), *want, torch.float32)
    with torch.no_grad():
        assert_close(compiled(idx, target, *params), want[0])


def test_bad_input():
    idx, target = _batch(12, 3, 27, seed=15)
    params = _params(3, 27, 10, 20)
    bad = idx.clone()
    bad[3, 1] = 27
    for op in (P.mlp_cross_entropy.default, P.mlp_cross_entropy_and_grads.default):
        with pytest.raises(IndexError, match=r"idx contains 27 at flat position 10, outside the valid range \[0, 27\)"):
            op(bad, target, *params)
        bad_t = target.clone()
        bad_t[0] = -5
        with pytest.raises(IndexError, match=r"target contains -5"):
            op(idx, bad_t, *params)
        with pytest.raises(ValueError, match=r"weight2 must have shape \[V, H\] = \[27, 20\]"):
            op(idx, target, params[0], params[1], params[2], params[3][:, :-1], params[4])
        with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[12\]"):
            op(idx, target[:-1], *params)
        with pytest.raises(TypeError, match="float32 or float64"):
            op(idx, target, *[p.detach().bfloat16() for p in params])
        with pytest.raises(TypeError, match="bias2 has dtype Double but table has dtype Float"):
            op(idx, target, *params[:4], params[4].double())


def test_model_training_form_uses_the_op_and_matches_the_plain_model():
    idx, target = _batch(256, 3, 27, seed=16)
    fused = charmlp.MLPLanguageModel(init="notebook")
    plain = charmlp.MLPLanguageModel(init="notebook", fused=False)
    logits, loss = fused(idx, target, return_logits=False)
    assert logits is None and "MlpCrossEntropyFunction" in loss.grad_fn.name()
    loss.backward()
    _, ref = plain(idx, target)
    ref.backward()
    assert_close(loss.detach(), ref.detach())
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, rtol=2e-4, atol=1e-5, msg=name)


def test_model_other_dtypes_fall_back_to_the_layer_ops():
    idx, target = _batch(32, 3, 27, seed=17)
    model = charmlp.MLPLanguageModel(dtype=torch.bfloat16)
    _, loss = model(idx, target, return_logits=False)
    assert loss.dtype == torch.bfloat16 and "MlpCrossEntropyFunction" not in loss.grad_fn.name()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
