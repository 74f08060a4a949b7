"""charmlp.ops.mlp_sgd_step: one fused SGD step == autograd + manual SGD in plain PyTorch
(charmlp.reference.mlp_sgd_step)."""

from __future__ import annotations

import pytest
import torch

from charmlp import ops, reference
from conftest import assert_close

# (B, T, V, E, H)
SHAPES = [(32, 3, 27, 10, 200), (1, 1, 2, 1, 1), (7, 2, 5, 3, 9), (100, 8, 27, 64, 33), (5000, 3, 27, 10, 200), (64, 4, 40, 5, 17),
          (40, 10, 6, 2, 20)]  # T = 10: past the single-pass limit of the folded loops (8)


def _params(T, V, E, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(V, E), (H, T * E), (H,), (V, H), (V,)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) * 0.5 for s in shapes]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, embed_algorithm):
    B, T, V, E, H = shape
    g = torch.Generator().manual_seed(B)
    idx = torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    params = _params(T, V, E, H)
    for step in range(3):
        ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.1)
        loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
        assert loss.shape == () and loss.dtype == torch.float32
        assert_close(loss, ref_loss)
        for got, want in zip(params, ref_params):
            assert_close(got, want, rtol=1e-4, atol=1e-5)
        params = [p.clone() for p in ref_params]  # re-sync so errors cannot compound


def test_float64_is_exact_to_rounding():
    idx = torch.randint(0, 6, (40, 3))
    target = torch.randint(0, 6, (40,))
    params = _params(3, 6, 4, 7, dtype=torch.float64)
    ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.5)
    loss = ops.mlp_sgd_step(idx, target, *params, 0.5)
    assert_close(loss, ref_loss)
    for got, want in zip(params, ref_params):
        assert_close(got, want)


# Batches that repeat contexts, so that the CPU kernel groups rows by context (its key
# table, V^T entries, is at most 128x the batch and at most 3/4 of the rows are distinct):
# (B, T, V, E, H, distinct contexts drawn from).
REPEATED = [(3000, 2, 6, 3, 20, 36), (4000, 3, 5, 4, 33, 125), (2000, 1, 27, 10, 200, 27),
            (20000, 3, 27, 10, 200, 300)]


@pytest.mark.parametrize("shape", REPEATED, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_repeated_contexts_match_reference(shape, dtype, embed_algorithm, context_grouping):
    B, T, V, E, H, distinct = shape
    g = torch.Generator().manual_seed(B)
    pool = torch.randint(0, V, (distinct, T), generator=g)
    idx = pool[torch.randint(0, distinct, (B,), generator=g)]
    target = torch.randint(0, V, (B,), generator=g)
    target[::5] = -100  # ignored rows inside groups
    target[(idx == idx[0]).all(dim=1)] = -100  # and one context whose rows are all ignored
    runs = []
    for _ in range(2):
        params = _params(T, V, E, H, dtype=dtype)
        ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.1)
        loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
        tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
        assert_close(loss, ref_loss, **tol)
        for got, want in zip(params, ref_params):
            assert_close(got, want, **tol)
        runs.append([loss] + params)
    for a, b in zip(*runs):  # bitwise reproducible
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ignored_targets_and_all_ignored():
    idx = torch.randint(0, 27, (20, 3))
    target = torch.randint(0, 27, (20,))
    target[::3] = -100
    params = _params(3, 27, 10, 30)
    ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.1)
    loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
    assert_close(loss, ref_loss)
    for got, want in zip(params, ref_params):
        assert_close(got, want, rtol=1e-4, atol=1e-5)
    target[:] = -100
    before = [p.clone() for p in params]
    loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
    assert torch.isnan(loss)
    for p, q in zip(params, before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_non_contiguous_parameters_are_updated_in_place():
    idx = torch.randint(0, 27, (16, 3))
    target = torch.randint(0, 27, (16,))
    params = _params(3, 27, 10, 20)
    ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.1)
    # weight1 and weight2 as transposed views of other storage.
    w1_store = params[1].T.contiguous()
    w2_store = params[3].T.contiguous()
    views = [params[0], w1_store.T, params[2], w2_store.T, params[4]]
    ops.mlp_sgd_step(idx, target, *views, 0.1)
    assert_close(w1_store.T, ref_params[1], rtol=1e-4, atol=1e-5)
    assert_close(w2_store.T, ref_params[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("V", [27, 0], ids=["V27", "empty-vocab"])
def test_empty_batch_is_a_nan_loss_and_no_update(V):
    params = _params(3, V, 10, 20)
    before = [p.clone() for p in params]
    loss = ops.mlp_sgd_step(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), *params, 0.1)
    assert torch.isnan(loss)  # the mean over no rows, as F.cross_entropy
    for p, q in zip(params, before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_deterministic_run_to_run(embed_algorithm):
    idx = torch.randint(0, 27, (8000, 3))
    target = torch.randint(0, 27, (8000,))
    results = []
    for _ in range(3):
        params = _params(3, 27, 10, 200)
        loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
        results.append([loss] + params)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck():
    idx = torch.randint(0, 27, (12, 3))
    target = torch.randint(0, 27, (12,))
    params = _params(3, 27, 10, 20)
    torch.library.opcheck(torch.ops.charmlp.mlp_sgd_step.default, (idx, target, *params, 0.1))


def test_torch_compile_fullgraph():
    idx = torch.randint(0, 27, (64, 3))
    target = torch.randint(0, 27, (64,))
    params = _params(3, 27, 10, 20)
    ref_loss, ref_params = reference.mlp_sgd_step(idx, target, params, lr=0.1)
    compiled = torch.compile(lambda i, t, *p: ops.mlp_sgd_step(i, t, *p, 0.1), fullgraph=True)
    loss = compiled(idx, target, *params)
    assert_close(loss, ref_loss)
    for got, want in zip(params, ref_params):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input():
    idx = torch.randint(0, 27, (12, 3))
    target = torch.randint(0, 27, (12,))
    params = _params(3, 27, 10, 20)
    bad = idx.clone()
    bad[3, 1] = 27
    with pytest.raises(IndexError, match=r"idx contains 27 .*\[0, 27\)"):
        ops.mlp_sgd_step(bad, target, *params, 0.1)
    bad_t = target.clone()
    bad_t[0] = -5
    with pytest.raises(IndexError, match=r"target contains -5"):
        ops.mlp_sgd_step(idx, bad_t, *params, 0.1)
    with pytest.raises(ValueError, match=r"weight2 must have shape \[V, H\] = \[27, 20\]"):
        ops.mlp_sgd_step(idx, target, params[0], params[1], params[2], params[3][:, :-1], params[4], 0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        ops.mlp_sgd_step(idx, target, *params, float("nan"))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.mlp_sgd_step(idx, target, *[p.bfloat16() for p in params], 0.1)
