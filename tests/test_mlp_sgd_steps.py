"""charmlp.ops.mlp_sgd_steps: K fused SGD steps in one call == K mlp_sgd_step calls, bitwise.

The op's contract: step k is exactly ``ops.mlp_sgd_step(idx[k], target[k], *params, lr[k])``
(same losses and parameters, bit for bit), every index of every step is checked before
the first step, and a bad argument raises with no parameter touched. The single-step
kernel itself is checked against plain PyTorch in test_mlp_sgd_step.py; here the K-step
op is checked against that kernel (bitwise) and, for a few steps, against the same
plain-PyTorch reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charmlp import _C, ops, reference
from charmlp.model import MLPLanguageModel
from conftest import assert_all_bitwise, assert_bitwise, assert_close
from test_mlp_sgd_step import _params

# Per-step learning rates, all different, so that a step run with another step's lr
# (or the first lr for every step) cannot go unnoticed.
LRS = [0.2, 0.05, 0.1, 0.3, 0.01, 0.15]

# (B, T, V, E, H): batches of contexts drawn uniformly (they rarely repeat).
SHAPES = [
    (32, 3, 27, 10, 200),  # the lecture's
    (1, 1, 2, 1, 1),  # the smallest model
    (7, 2, 5, 3, 9),
    (40, 10, 6, 2, 20),  # T = 10: past the single-pass limit of the folded loops (8)
    (64, 4, 40, 5, 17),  # V = 40
]

# (B, T, V, E, H, distinct): batches whose contexts come from a pool of `distinct`, so the
# CPU kernel groups rows by context (key table V^T <= 128 B, at most 3/4 of rows distinct)
# and, at these sizes, takes the folded first layer under the 'auto' algorithm.
REPEATED = [(5000, 3, 27, 10, 200, 300), (3000, 2, 6, 3, 20, 36)]

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def _batches(K, B, T, V, distinct=None, seed=0, index_dtype=torch.int64):
    """K minibatches, idx [K, B, T] and target [K, B]; with `distinct`, every row's context
    is one of a fixed pool of that many (so batches repeat contexts)."""
    g = torch.Generator().manual_seed(seed)
    if distinct is None:
        idx = torch.randint(0, V, (K, B, T), generator=g)
    else:
        pool = torch.randint(0, V, (distinct, T), generator=g)
        idx = pool[torch.randint(0, distinct, (K, B), generator=g)]
    target = torch.randint(0, V, (K, B), generator=g)
    return idx.to(index_dtype), target.to(index_dtype)


def _clones(params):
    return [p.clone() for p in params]


def _step_loop(idx, target, params, lrs):
    """The op's definition: K successive mlp_sgd_step calls (params updated in place); the [K] losses."""
    losses = [ops.mlp_sgd_step(idx[k], target[k], *params, lr) for k, lr in enumerate(lrs)]
    return torch.stack(losses) if losses else params[0].new_empty((0,))


def _check_matches_step_loop(idx, target, params, lrs):
    """Runs mlp_sgd_steps and the mlp_sgd_step loop from copies of params and asserts that
    the losses and the five updated parameters are bitwise equal."""
    fused, looped = _clones(params), _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *fused, lrs)
    expected = _step_loop(idx, target, looped, lrs)
    assert losses.shape == (idx.shape[0],) and losses.dtype == params[0].dtype
    assert_bitwise(losses, expected)
    assert_all_bitwise(fused, looped)
    return losses, fused


# --------------------------------------------------------------------------------------
# 1. Bitwise equal to K mlp_sgd_step calls
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_step_loop(shape, dtype, embed_algorithm):
    """Losses and parameters of one call of 4 steps (each its own batch and lr) equal,
    bit for bit, those of 4 mlp_sgd_step calls, under each first-layer algorithm."""
    B, T, V, E, H = shape
    idx, target = _batches(4, B, T, V, seed=B)
    losses, after = _check_matches_step_loop(idx, target, _params(T, V, E, H, dtype), LRS[:4])
    assert torch.isfinite(losses).all()
    assert not torch.equal(after[3], _params(T, V, E, H, dtype)[3])  # the steps did train


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", REPEATED, ids=str)
def test_repeated_contexts_match_step_loop(shape, dtype, embed_algorithm, context_grouping):
    """As test_matches_step_loop for large batches that repeat contexts (grouped and folded
    paths), with ignored rows inside the groups and one context whose rows are all ignored."""
    B, T, V, E, H, distinct = shape
    idx, target = _batches(3, B, T, V, distinct=distinct, seed=B)
    target[:, ::5] = -100
    target[(idx == idx[0, 0]).all(dim=-1)] = -100
    _check_matches_step_loop(idx, target, _params(T, V, E, H, dtype), LRS[:3])


def test_repeated_shape_exercises_context_grouping():
    """Guards the coverage of the tests above: with grouping on, the K-step op really takes
    the grouped path on REPEATED[0] (it sums in another order, so the bits differ from the
    ungrouped run), while both stay within rounding of each other."""
    B, T, V, E, H, distinct = REPEATED[0]
    idx, target = _batches(2, B, T, V, distinct=distinct)
    runs, previous = [], _C._get_context_grouping()
    for grouped in (True, False):
        _C._set_context_grouping(grouped)
        try:
            params = _params(T, V, E, H, torch.float64)
            runs.append([ops.mlp_sgd_steps(idx, target, *params, LRS[:2])] + params)
        finally:
            _C._set_context_grouping(previous)
    assert any(not torch.equal(a, b) for a, b in zip(*runs))
    for a, b in zip(*runs):
        assert_close(a, b)


@pytest.mark.parametrize("distinct", [None, 40], ids=["uniform", "repeated"])
def test_int32_indices_match_int64(distinct):
    """int32 idx and target give bitwise the int64 results (and those of the step loop)."""
    idx, target = _batches(3, 600, 3, 27, distinct=distinct)
    target[1, ::4] = -100
    params = _params(3, 27, 10, 30)
    losses64, params64 = _check_matches_step_loop(idx, target, params, LRS[:3])
    losses32, params32 = _check_matches_step_loop(idx.int(), target.int(), params, LRS[:3])
    assert_all_bitwise([losses32] + params32, [losses64] + params64)


def test_ignored_targets_and_an_all_ignored_step():
    """Rows with target -100 are left out; a step whose rows are all ignored has a NaN loss
    and changes nothing: skipping it (and its lr) gives bitwise the same parameters."""
    idx, target = _batches(3, 20, 3, 27)
    target[0, ::3] = -100
    target[1] = -100
    params = _params(3, 27, 10, 30)
    losses, after = _check_matches_step_loop(idx, target, params, LRS[:3])
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    skipped = _clones(params)
    kept = [0, 2]
    losses_kept = ops.mlp_sgd_steps(idx[kept], target[kept], *skipped, [LRS[0], LRS[2]])
    assert_bitwise(losses[kept], losses_kept)
    assert_all_bitwise(after, skipped)


# --------------------------------------------------------------------------------------
# 2. Against plain PyTorch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [SHAPES[0] + (None,), REPEATED[0]], ids=["lecture", "repeated"])
def test_matches_reference(shape, dtype):
    """Three steps equal three steps of autograd + manual SGD in plain PyTorch, chained
    without re-syncing (float64 to rounding, float32 to the usual tolerance)."""
    B, T, V, E, H, distinct = shape
    idx, target = _batches(3, B, T, V, distinct=distinct, seed=1)
    target[2, ::7] = -100
    params = _params(T, V, E, H, dtype)
    losses = ops.mlp_sgd_steps(idx, target, *params, LRS[:3])
    ref = _params(T, V, E, H, dtype)
    ref_losses = []
    for k in range(3):
        loss, ref = reference.mlp_sgd_step(idx[k], target[k], ref, LRS[k])
        ref_losses.append(loss)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close(losses, torch.stack(ref_losses), **tol)
    for got, want in zip(params, ref):
        assert_close(got, want, **tol)


# --------------------------------------------------------------------------------------
# 3-5. The lr argument, empty shapes, non-contiguous parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.07, 1, np.float32(0.07), torch.tensor(0.07, dtype=torch.float64)],
                         ids=["float", "int", "numpy-float32", "0-d-tensor"])
def test_scalar_lr_is_broadcast_to_every_step(lr):
    """A single number (or 0-d tensor) as lr is that lr for each of the K steps: bitwise
    the list form."""
    idx, target = _batches(4, 32, 3, 27)
    params = _params(3, 27, 10, 30)
    scalar, listed = _clones(params), _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *scalar, lr)
    assert_bitwise(losses, ops.mlp_sgd_steps(idx, target, *listed, [float(lr)] * 4))
    assert_all_bitwise(scalar, listed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lr", [0.1, []], ids=["float-lr", "empty-list"])
def test_no_steps_returns_empty_and_changes_nothing(lr, dtype):
    """K = 0: an empty [0] tensor in the parameters' dtype, parameters untouched."""
    idx, target = _batches(0, 32, 3, 27)
    params = _params(3, 27, 10, 30, dtype)
    before = _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *params, lr)
    assert losses.shape == (0,) and losses.dtype == dtype
    assert_all_bitwise(params, before)


@pytest.mark.parametrize("V", [27, 0], ids=["V27", "empty-vocab"])
def test_empty_batches_are_nan_losses_and_no_update(V):
    """B = 0: each of the K losses is NaN (a mean over no rows, as F.cross_entropy) and no
    parameter changes; with V = 0 too, since no index has to be valid."""
    idx, target = _batches(3, 0, 3, max(V, 1))
    params = _params(3, V, 10, 20)
    before = _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *params, LRS[:3])
    assert losses.shape == (3,) and torch.isnan(losses).all()
    assert_all_bitwise(params, before)


def test_non_contiguous_parameters_are_updated_in_place():
    """Transposed views (weight1, weight2) and a column slice (table) are updated through
    their storage, bitwise as contiguous parameters would be; the slice's neighbours stay."""
    idx, target = _batches(3, 300, 3, 27)
    params = _params(3, 27, 10, 20)
    contiguous = _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *contiguous, LRS[:3])

    table_store = torch.full((27, 12), 7.0)
    table_store[:, 1:11] = params[0]
    w1_store = params[1].T.contiguous()
    w2_store = params[3].T.contiguous()
    views = [table_store[:, 1:11], w1_store.T, params[2].clone(), w2_store.T, params[4].clone()]
    assert not any(v.is_contiguous() for v in (views[0], views[1], views[3]))
    assert_bitwise(ops.mlp_sgd_steps(idx, target, *views, LRS[:3]), losses)
    assert_all_bitwise(
        [table_store[:, 1:11], w1_store.T, views[2], w2_store.T, views[4]], contiguous
    )
    assert (table_store[:, 0] == 7).all() and (table_store[:, 11] == 7).all()


# --------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("name, bad_value", [("idx", 27), ("target", -5)])
def test_bad_index_in_last_step_raises_before_any_step(name, bad_value, index_dtype):
    """One bad index in the last step: IndexError naming the argument, the value and its
    flat position in the flattened tensor, and not one parameter changed."""
    K, B, T = 4, 16, 3
    idx, target = _batches(K, B, T, 27, index_dtype=index_dtype)
    b, t = 9, 2
    if name == "idx":
        idx[K - 1, b, t] = bad_value
        position = ((K - 1) * B + b) * T + t
    else:
        target[K - 1, b] = bad_value
        position = (K - 1) * B + b
    params = _params(T, 27, 10, 20)
    before = _clones(params)
    with pytest.raises(IndexError, match=rf"{name} contains {bad_value} at flat position {position}, .*\[0, 27\)"):
        ops.mlp_sgd_steps(idx, target, *params, LRS[:K])
    assert_all_bitwise(params, before)


def _bad(idx=None, target=None, params=None, lr=None, **param_overrides):
    """Arguments of a K = 3, B = 12 call (T 3, V 27, E 10, H 20) with some replaced."""
    good_idx, good_target = _batches(3, 12, 3, 27)
    names = ["table", "weight1", "bias1", "weight2", "bias2"]
    params = params if params is not None else _params(3, 27, 10, 20)
    params = [param_overrides.get(n, p) for n, p in zip(names, params)]
    return (
        good_idx if idx is None else idx,
        good_target if target is None else target,
        params,
        LRS[:3] if lr is None else lr,
    )


BAD_ARGUMENTS = {
    "idx-2d": (lambda: _bad(idx=torch.zeros(12, 3, dtype=torch.long)), ValueError,
               r"idx must be 3-D \[K, B, T\].*got shape \[12, 3\]"),
    "idx-4d": (lambda: _bad(idx=torch.zeros(3, 12, 3, 1, dtype=torch.long)), ValueError,
               r"idx must be 3-D \[K, B, T\]"),
    "idx-float": (lambda: _bad(idx=torch.zeros(3, 12, 3)), TypeError, r"idx must be an int64 or int32"),
    "target-short-B": (lambda: _bad(target=torch.zeros(3, 11, dtype=torch.long)), ValueError,
                       r"target must have shape \[K, B\] = \[3, 12\] to match idx \[3, 12, 3\], got \[3, 11\]"),
    "target-short-K": (lambda: _bad(target=torch.zeros(2, 12, dtype=torch.long)), ValueError,
                       r"target must have shape \[K, B\] = \[3, 12\].*got \[2, 12\]"),
    "target-1d": (lambda: _bad(target=torch.zeros(36, dtype=torch.long)), ValueError,
                  r"target must be 2-D \[K, B\]"),
    "too-few-lrs": (lambda: _bad(lr=[0.1, 0.1]), ValueError,
                    r"lr must hold one learning rate per step \(K = 3\), got 2"),
    "too-many-lrs": (lambda: _bad(lr=[0.1] * 4), ValueError, r"\(K = 3\), got 4"),
    "nan-lr": (lambda: _bad(lr=[0.1, float("nan"), 0.1]), ValueError, r"lr\[1\] must be finite, got nan"),
    "inf-lr": (lambda: _bad(lr=[0.1, 0.1, float("inf")]), ValueError, r"lr\[2\] must be finite, got inf"),
    "scalar-inf-lr": (lambda: _bad(lr=float("-inf")), ValueError, r"lr\[0\] must be finite, got -inf"),
    "table-width": (lambda: _bad(table=torch.zeros(27, 11)), ValueError,
                    r"weight1 must have shape \[H, T\*E\] = \[H, 33\] for idx \[12, 3\]"),
    "weight1-shape": (lambda: _bad(weight1=torch.zeros(20, 29)), ValueError,
                      r"weight1 must have shape \[H, T\*E\] = \[H, 30\] for idx \[12, 3\] and table \[27, 10\], "
                      r"got \[20, 29\]"),
    "bias1-shape": (lambda: _bad(bias1=torch.zeros(19)), ValueError, r"bias1 must have shape \[H\] = \[20\]"),
    "weight2-shape": (lambda: _bad(weight2=torch.zeros(27, 19)), ValueError,
                      r"weight2 must have shape \[V, H\] = \[27, 20\], got \[27, 19\]"),
    "bias2-shape": (lambda: _bad(bias2=torch.zeros(26)), ValueError, r"bias2 must have shape \[V\] = \[27\]"),
    "mixed-dtypes": (lambda: _bad(weight2=torch.zeros(27, 20, dtype=torch.float64)), TypeError,
                     r"weight2 has dtype Double but table has dtype Float"),
    "bfloat16": (lambda: _bad(params=[p.bfloat16() for p in _params(3, 27, 10, 20)]), TypeError,
                 r"mlp_sgd_steps on CPU takes float32 or float64 parameters, got BFloat16"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_and_change_nothing(case):
    """Each malformed call raises a clear exception (type and message) and updates nothing."""
    make_args, error, message = case
    idx, target, params, lr = make_args()
    before = _clones(params)
    with pytest.raises(error, match=message):
        ops.mlp_sgd_steps(idx, target, *params, lr)
    for p, q in zip(params, before):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------
# 7. opcheck, torch.compile
# --------------------------------------------------------------------------------------


def test_opcheck():
    """The schema (mutated parameters), fake kernel and dispatch registrations are consistent."""
    idx, target = _batches(2, 12, 3, 27)
    params = _params(3, 27, 10, 20)
    torch.library.opcheck(torch.ops.charmlp.mlp_sgd_steps.default, (idx, target, *params, LRS[:2]))


def test_torch_compile_fullgraph_matches_eager():
    """A function calling ops.mlp_sgd_steps compiles with fullgraph=True, and its losses and
    in-place updates are bitwise those of the eager op."""
    idx, target = _batches(3, 64, 3, 27)
    params = _params(3, 27, 10, 20)
    eager, compiled_params = _clones(params), _clones(params)
    compiled = torch.compile(lambda i, t, *p: ops.mlp_sgd_steps(i, t, *p, LRS[:3]), fullgraph=True)
    losses = compiled(idx, target, *compiled_params)
    assert_bitwise(losses, ops.mlp_sgd_steps(idx, target, *eager, LRS[:3]))
    assert_all_bitwise(compiled_params, eager)
    assert not torch.equal(compiled_params[1], params[1])


# --------------------------------------------------------------------------------------
# 8. Determinism, splitting
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPES[0] + (None,), REPEATED[0]], ids=["lecture", "repeated"])
def test_deterministic_run_to_run(shape, embed_algorithm):
    """Two runs from the same parameters give bitwise the same losses and parameters."""
    B, T, V, E, H, distinct = shape
    idx, target = _batches(3, B, T, V, distinct=distinct)
    runs = []
    for _ in range(2):
        params = _params(T, V, E, H)
        runs.append([ops.mlp_sgd_steps(idx, target, *params, LRS[:3])] + params)
    assert_all_bitwise(*runs)


@pytest.mark.parametrize("split", [(2, 4), (1,) * 6, (5, 0, 1)], ids=str)
def test_result_does_not_depend_on_how_steps_are_split_over_calls(split):
    """6 steps in one call == the same 6 steps over several calls (an empty call included)."""
    idx, target = _batches(6, 48, 3, 27)
    params = _params(3, 27, 10, 30)
    whole = _clones(params)
    losses = ops.mlp_sgd_steps(idx, target, *whole, LRS)
    parts, k = [], 0
    for n in split:
        parts.append(ops.mlp_sgd_steps(idx[k:k + n], target[k:k + n], *params, LRS[k:k + n]))
        k += n
    assert_bitwise(torch.cat(parts), losses)
    assert_all_bitwise(params, whole)


# --------------------------------------------------------------------------------------
# 9. MLPLanguageModel.sgd_steps
# --------------------------------------------------------------------------------------


def _model(fused):
    return MLPLanguageModel(vocab_size=27, block_size=3, emb_dim=10, hidden=200, fused=fused, init="notebook")


@pytest.mark.parametrize("K", [5, 0])
def test_model_sgd_steps_matches_sgd_step_loop(K):
    """The fused model's sgd_steps is bitwise K sgd_step calls; it leaves .grad alone and
    returns losses outside autograd."""
    idx, target = _batches(K, 32, 3, 27)
    model, looped = _model(True), _model(True)
    losses = model.sgd_steps(idx, target, LRS[:K])
    expected = [looped.sgd_step(idx[k], target[k], LRS[k]) for k in range(K)]
    assert_bitwise(losses, torch.stack(expected) if K else torch.empty(0))
    assert_all_bitwise(list(model.parameters()), list(looped.parameters()))
    assert not losses.requires_grad
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_model_sgd_steps_unfused_close_to_fused():
    """fused=False runs the same steps through plain PyTorch: the same losses and parameters
    up to float32 rounding."""
    idx, target = _batches(4, 32, 3, 27, seed=3)
    fused, unfused = _model(True), _model(False)
    assert_close(unfused.sgd_steps(idx, target, LRS[:4]), fused.sgd_steps(idx, target, LRS[:4]))
    for got, want in zip(unfused.parameters(), fused.parameters()):
        assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    "idx_shape, n_lrs, message",
    [((32, 3), 2, r"idx must have shape \[K, B, block_size=3\], got \(32, 3\)"),
     ((2, 32, 4), 2, r"idx must have shape \[K, B, block_size=3\], got \(2, 32, 4\)"),
     ((2, 32, 3), 3, r"lrs must hold one learning rate per step \(K = 2\), got 3")],
    ids=["2-D", "wrong-block", "lrs-count"],
)
def test_model_sgd_steps_rejects_bad_shapes(fused, idx_shape, n_lrs, message):
    """Wrong idx shapes and a wrong number of lrs raise ValueError, and nothing is trained."""
    model = _model(fused)
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.zeros(idx_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        model.sgd_steps(idx, torch.zeros(idx_shape[:2], dtype=torch.long), [0.1] * n_lrs)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
