"""charmlp.ops.mlp_adamw_steps: K AdamW steps in one call == K steps of torch.optim.AdamW(fused=True).

The op's contract: given a fused ``torch.optim.AdamW`` whose state exists, calling the op
on that optimizer's own state tensors (``exp_avg``, ``exp_avg_sq``, ``step``) with the
parameters detached is bitwise the loop

    for k: opt.param_groups[0]["lr"] = lr[k]; loss = model.forward_backward(idx[k], target[k]); opt.step()

(same losses, parameters and optimizer state, bit for bit); every index of every step is
checked before the first step, and a bad argument raises with nothing changed.
``DirectFusedAdamW.steps`` (the training loop's AdamW path) is checked against the same
loop, and ``charmlp.train.train`` against its per-step path.
"""

from __future__ import annotations

import copy

import pytest
import torch

import charmlp.train as train_mod
from charmlp import _C, ops
from charmlp.checkpoint import load_checkpoint
from charmlp.model import MLPLanguageModel
from charmlp.train import DirectFusedAdamW, TrainConfig, train
from conftest import assert_all_bitwise, assert_bitwise, assert_close
from test_mlp_sgd_steps import _batches

# Per-step learning rates, all different, so that a step run with another step's lr (or
# the group's lr, or the first lr for every step) cannot go unnoticed.
LRS = [0.01, 0.003, 0.02, 0.0005, 0.015, 0.007]

# (B, T, V, E, H)
LECTURE = (32, 3, 27, 10, 200)
SMALL = (7, 2, 5, 3, 9)  # odd sizes, vocab 5
SHAPES = {"lecture": LECTURE, "small": SMALL}

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]

# The optimizer's hyper-parameters (its group's lr is never used: every step sets its own).
HYPER = {
    "defaults": dict(),  # torch's AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
    "custom": dict(betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1),
    "no-decay": dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0),
}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _model(shape, dtype=torch.float32, fused=True):
    B, T, V, E, H = shape
    model = MLPLanguageModel(vocab_size=V, block_size=T, emb_dim=E, hidden=H, fused=fused, init="notebook")
    return model.to(dtype)


def _adamw(params, **hyper):
    return torch.optim.AdamW(params, **{"lr": 0.01, **hyper}, fused=True)


def _warm_pair(shape, dtype=torch.float32, **hyper):
    """A model and its fused AdamW after one ordinary step (forward_backward + opt.step()),
    so the optimizer's state exists. Deterministic: two calls give identical pairs."""
    B, T, V, E, H = shape
    model = _model(shape, dtype)
    opt = _adamw(model.parameters(), **hyper)
    idx, target = _batches(1, B, T, V, seed=1234)
    model.forward_backward(idx[0], target[0])
    opt.step()
    return model, opt


def _state_lists(model, opt):
    """The op's four lists (params detached, exp_avgs, exp_avg_sqs, state_steps), in the
    model's order table, weight1, bias1, weight2, bias2."""
    params = model._step_parameters()
    states = [opt.state[p] for p in params]
    return ([p.detach() for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states])


def _all_tensors(model, opt):
    """Every parameter and every state tensor of the optimizer, in a fixed order."""
    return [t for lst in _state_lists(model, opt) for t in lst]


def _snapshot(model, opt):
    return [t.clone() for t in _all_tensors(model, opt)]


def _hyper_kwargs(opt):
    g = opt.param_groups[0]
    return dict(beta1=g["betas"][0], beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"])


def _op_steps(model, opt, idx, target, lr, **kw):
    """ops.mlp_adamw_steps on the optimizer's own state, with its group's hyper-parameters
    (unless given in kw)."""
    with torch.no_grad():
        return ops.mlp_adamw_steps(idx, target, *_state_lists(model, opt), lr, **{**_hyper_kwargs(opt), **kw})


def _opt_loop(model, opt, idx, target, lrs):
    """The op's definition: forward_backward + torch's own opt.step() per step; the [K] losses."""
    losses = []
    for k, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        losses.append(model.forward_backward(idx[k], target[k]))
        opt.step()
    return torch.stack(losses) if losses else model.embed.table.new_empty((0,))


def _check_matches_opt_loop(shape, dtype, idx, target, lrs, **hyper):
    """Runs the op on one warm (model, AdamW) pair and the opt.step() loop on an identical
    pair; asserts losses, parameters and state (exp_avg, exp_avg_sq, step) bitwise equal.
    Returns the losses and the op's pair."""
    model, opt = _warm_pair(shape, dtype, **hyper)
    ref_model, ref_opt = _warm_pair(shape, dtype, **hyper)
    start = _snapshot(model, opt)
    assert_all_bitwise(start, _all_tensors(ref_model, ref_opt))  # (the pairs start equal)
    losses = _op_steps(model, opt, idx, target, lrs)
    expected = _opt_loop(ref_model, ref_opt, idx, target, lrs)
    assert losses.shape == (len(lrs),) and losses.dtype == dtype
    assert_bitwise(losses, expected)
    assert_all_bitwise(_all_tensors(model, opt), _all_tensors(ref_model, ref_opt))
    assert all(float(s) == 1 + len(lrs) for s in _state_lists(model, opt)[3])
    return losses, (model, opt), start


# --------------------------------------------------------------------------------------
# 1. Bitwise equal to torch.optim.AdamW(fused=True)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hyper", HYPER.values(), ids=HYPER.keys())
@pytest.mark.parametrize("K", [1, 2, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_adamw_opt_step_loop(shape, dtype, K, hyper):
    """K steps in one call (each its own batch and lr) equal, bit for bit, K steps of
    forward_backward + AdamW(fused=True).step(): losses, parameters, exp_avg, exp_avg_sq
    and step, for both dtypes, two model sizes and several hyper-parameter sets."""
    B, T, V, E, H = shape
    idx, target = _batches(K, B, T, V, seed=K)
    losses, (model, opt), start = _check_matches_opt_loop(shape, dtype, idx, target, LRS[:K], **hyper)
    assert torch.isfinite(losses).all()
    after = _all_tensors(model, opt)
    for i in range(15):  # every parameter, exp_avg and exp_avg_sq moved (the steps did run)
        assert not torch.equal(after[i], start[i]), i


def test_default_hyper_parameters_are_adamw_defaults():
    """Called without beta1/beta2/weight_decay/eps, the op is bitwise a default
    torch.optim.AdamW(fused=True) (betas 0.9/0.999, weight_decay 0.01, eps 1e-8)."""
    idx, target = _batches(3, 32, 3, 27, seed=5)
    model, opt = _warm_pair(LECTURE)
    ref_model, ref_opt = _warm_pair(LECTURE)
    with torch.no_grad():
        losses = ops.mlp_adamw_steps(idx, target, *_state_lists(model, opt), LRS[:3])
    assert_bitwise(losses, _opt_loop(ref_model, ref_opt, idx, target, LRS[:3]))
    assert_all_bitwise(_all_tensors(model, opt), _all_tensors(ref_model, ref_opt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ignored_targets_and_an_all_ignored_step(dtype):
    """Rows with target -100 are left out; a step whose rows are all ignored has a NaN loss
    (as forward_backward's) and still takes AdamW's step (momentum, weight decay): the
    op and the loop agree bitwise, NaN included."""
    idx, target = _batches(3, 20, 3, 27, seed=7)
    target[0, ::3] = -100
    target[1] = -100
    losses, _, _ = _check_matches_opt_loop(LECTURE, dtype, idx, target, LRS[:3])
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


# A large batch whose contexts come from a pool of 50: the CPU kernels group rows by
# context (and, under 'auto', fold the first layer).
REPEATED = dict(K=3, B=3000, distinct=50)


def _repeated_batches():
    _, T, V, _, _ = LECTURE
    idx, target = _batches(REPEATED["K"], REPEATED["B"], T, V, distinct=REPEATED["distinct"], seed=11)
    target[:, ::5] = -100
    target[(idx == idx[0, 0]).all(dim=-1)] = -100  # one context whose rows are all ignored
    return idx, target


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_repeated_contexts_match_opt_step_loop(dtype, embed_algorithm, context_grouping):
    """As test_matches_adamw_opt_step_loop for a batch of 3000 rows drawn from 50 contexts,
    with ignored rows, under each first-layer algorithm, grouping on and off."""
    idx, target = _repeated_batches()
    _check_matches_opt_loop(LECTURE, dtype, idx, target, LRS[:REPEATED["K"]], **HYPER["custom"])


def test_repeated_shape_exercises_context_grouping():
    """Guards the coverage of the test above: with grouping on the op really takes the
    grouped path (it sums in another order, so some bits differ from the ungrouped run),
    while both runs stay within rounding of each other."""
    idx, target = _repeated_batches()
    runs, previous = [], _C._get_context_grouping()
    for grouped in (True, False):
        _C._set_context_grouping(grouped)
        try:
            model, opt = _warm_pair(LECTURE, torch.float64)
            losses = _op_steps(model, opt, idx, target, LRS[:REPEATED["K"]])
            runs.append([losses] + _all_tensors(model, opt))
        finally:
            _C._set_context_grouping(previous)
    assert any(not torch.equal(a, b) for a, b in zip(*runs))
    for a, b in zip(*runs):
        assert_close(a, b, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------
# 2. DirectFusedAdamW.steps and fits
# --------------------------------------------------------------------------------------


def _pair_from(source_model, source_opt):
    """A new model and AdamW with source's parameters and optimizer state (load_state_dict)."""
    model = _model(LECTURE)
    model.load_state_dict(source_model.state_dict())
    opt = _adamw(model.parameters(), lr=0.5)  # (the loaded group replaces this lr)
    opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))  # (state_dict() shares tensors)
    return model, opt


def _count_op_steps(monkeypatch):
    """Wraps ops.mlp_adamw_steps to record K of each call (DirectFusedAdamW calls ops.*)."""
    real, calls = ops.mlp_adamw_steps, []

    def counting(idx, *args, **kw):
        calls.append(idx.shape[0])
        return real(idx, *args, **kw)

    monkeypatch.setattr(ops, "mlp_adamw_steps", counting)
    return calls


@pytest.mark.parametrize(
    "start, split",
    [("fresh", (1,)), ("fresh", (6,)), ("fresh", (1, 5)), ("fresh", (4, 2)),
     ("loaded", (1,)), ("loaded", (6,)), ("loaded", (2, 4))],
    ids=lambda v: v if isinstance(v, str) else "+".join(map(str, v)),
)
def test_direct_fused_adamw_steps_matches_opt_step_loop(start, split, monkeypatch):
    """DirectFusedAdamW.steps over chunks of steps (as the training loop calls it) is
    bitwise the forward_backward + opt.step() loop: losses, parameters, state, and the
    group's lr afterwards (lrs[-1]); it leaves .grad None. From a fresh optimizer the first
    step is torch's opt.step() (which creates the state) and the rest go through the op;
    from a state loaded with load_state_dict every step goes through the op."""
    K = sum(split)
    idx, target = _batches(K, 32, 3, 27, seed=3)
    lrs = LRS[:K]
    if start == "fresh":
        model, ref_model = _model(LECTURE), _model(LECTURE)
        opt, ref_opt = _adamw(model.parameters()), _adamw(ref_model.parameters())
    else:
        source = _warm_pair(LECTURE)
        src_idx, src_target = _batches(2, 32, 3, 27, seed=99)
        _opt_loop(*source, src_idx, src_target, [0.02, 0.004])
        model, opt = _pair_from(*source)
        ref_model, ref_opt = _pair_from(*source)
    calls = _count_op_steps(monkeypatch)

    direct = DirectFusedAdamW(opt)
    assert DirectFusedAdamW.applies(opt) and direct.fits(model)
    losses, k = [], 0
    for n in split:
        losses += direct.steps(model, idx[k:k + n], target[k:k + n], lrs[k:k + n])
        k += n
    expected = _opt_loop(ref_model, ref_opt, idx, target, lrs)

    assert losses == expected.tolist()
    assert_all_bitwise(_all_tensors(model, opt), _all_tensors(ref_model, ref_opt))
    assert opt.param_groups[0]["lr"] == lrs[-1] == ref_opt.param_groups[0]["lr"]
    assert all(p.grad is None for p in model.parameters())
    assert sum(calls) == K - (1 if start == "fresh" else 0)  # every other step went through the op
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]


def test_direct_fused_adamw_steps_with_no_steps_changes_nothing():
    """steps() with K = 0 returns no losses and changes neither state nor the group's lr."""
    model, opt = _warm_pair(LECTURE)
    before, lr = _snapshot(model, opt), opt.param_groups[0]["lr"]
    idx, target = _batches(0, 32, 3, 27)
    assert DirectFusedAdamW(opt).steps(model, idx, target, []) == []
    assert_all_bitwise(_all_tensors(model, opt), before)
    assert opt.param_groups[0]["lr"] == lr


def _unfused_pair(model):
    unfused = _model(LECTURE, fused=False)
    return unfused, _adamw(unfused.parameters())


# name -> (a function of a fused model returning the model to check and an optimizer, fits())
FITS = {
    "fused-model": (lambda m: (m, _adamw(m.parameters())), True),
    "unfused-model": (_unfused_pair, False),
    "other-params": (lambda m: (m, _adamw(_model(LECTURE).parameters())), False),
    "reordered-params": (lambda m: (m, _adamw(list(m.parameters())[::-1])), False),
    "fewer-params": (lambda m: (m, _adamw(list(m.parameters())[:4])), False),
}


@pytest.mark.parametrize("case", FITS.values(), ids=FITS.keys())
def test_direct_fused_adamw_fits(case):
    """fits() holds only for a fused model whose five parameters are the optimizer's, in
    the op's order: not for a fused=False model, nor an optimizer over other parameters
    (another model's, reordered, or fewer)."""
    make, expected = case
    model, opt = make(_model(LECTURE))
    assert DirectFusedAdamW.applies(opt)
    assert DirectFusedAdamW(opt).fits(model) is expected


@pytest.mark.parametrize("case", ["lr-count", "other-model"])
def test_direct_fused_adamw_steps_checks_before_the_first_step(case):
    """steps() refuses a wrong number of lrs, or a model that is not the optimizer's, before
    anything runs, even on a fresh optimizer whose first step would go through opt.step()."""
    model = _model(LECTURE)
    opt = _adamw(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    idx, target = _batches(3, 32, 3, 27)
    lrs, target_model = ([0.02] * 2, model) if case == "lr-count" else ([0.02] * 3, _model(LECTURE))
    with pytest.raises(ValueError, match="DirectFusedAdamW.steps"):
        DirectFusedAdamW(opt).steps(target_model, idx, target, lrs)
    assert not opt.state and opt.param_groups[0]["lr"] == 0.01
    assert_all_bitwise([p.detach() for p in model.parameters()], before)


# --------------------------------------------------------------------------------------
# 3. The lr argument, K = 0
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.004, torch.tensor(0.004, dtype=torch.float64)], ids=["float", "0-d-tensor"])
def test_scalar_lr_is_broadcast_to_every_step(lr):
    """A single number (or 0-d tensor) as lr is that lr for each of the K steps: bitwise
    the list form."""
    idx, target = _batches(4, 32, 3, 27, seed=2)
    scalar, listed = _warm_pair(LECTURE), _warm_pair(LECTURE)
    losses = _op_steps(*scalar, idx, target, lr)
    assert_bitwise(losses, _op_steps(*listed, idx, target, [float(lr)] * 4))
    assert_all_bitwise(_all_tensors(*scalar), _all_tensors(*listed))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lr", [0.01, []], ids=["float-lr", "empty-list"])
def test_no_steps_returns_empty_and_changes_nothing(lr, dtype):
    """K = 0: an empty [0] tensor in the parameters' dtype; parameters and state (the step
    counts included) untouched."""
    idx, target = _batches(0, 32, 3, 27)
    model, opt = _warm_pair(LECTURE, dtype)
    before = _snapshot(model, opt)
    losses = _op_steps(model, opt, idx, target, lr)
    assert losses.shape == (0,) and losses.dtype == dtype
    assert_all_bitwise(_all_tensors(model, opt), before)
    assert all(float(s) == 1 for s in _state_lists(model, opt)[3])


# --------------------------------------------------------------------------------------
# 4. Errors
# --------------------------------------------------------------------------------------

ERR_SHAPE = (12, 3, 27, 10, 20)  # (B, T, V, E, H) of the error tests; K = 3


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("name, bad_value", [("idx", 27), ("idx", -1), ("idx", -100), ("target", -5),
                                             ("target", 27)])
def test_bad_index_in_last_step_raises_before_any_step(name, bad_value, index_dtype):
    """Bad indices in the last step only: IndexError naming the argument, the value and
    the lowest bad flat position, with no parameter or optimizer state changed (-100 is
    only allowed in target)."""
    K, (B, T, V, E, H) = 3, ERR_SHAPE
    idx, target = _batches(K, B, T, V, index_dtype=index_dtype)
    b, t = 9, 2
    if name == "idx":
        idx[K - 1, b, t] = bad_value
        idx[K - 1, b + 2, 0] = 30  # a second bad index at a higher position
        position = ((K - 1) * B + b) * T + t
    else:
        target[K - 1, b] = bad_value
        target[K - 1, b + 2] = 30
        position = (K - 1) * B + b
    model, opt = _warm_pair(ERR_SHAPE)
    before = _snapshot(model, opt)
    with pytest.raises(IndexError, match=rf"^charmlp: {name} contains {bad_value} at flat position {position}, "
                                         rf"outside the valid range \[0, 27\)$"):
        _op_steps(model, opt, idx, target, LRS[:K])
    assert_all_bitwise(_all_tensors(model, opt), before)


def _replace(lst, i, value):
    return lst[:i] + [value] + lst[i + 1:]


# name -> (a function of the good arguments (a dict) returning the bad ones, error, message)
BAD_ARGUMENTS = {
    **{f"{name}-4-tensors": (lambda a, name=name: {**a, name: a[name][:4]}, ValueError,
                             rf"{name} must hold 5 tensors \(table, weight1, bias1, weight2, bias2\), got 4")
       for name in ("params", "exp_avgs", "exp_avg_sqs", "state_steps")},
    "exp_avg-shape": (lambda a: {**a, "exp_avgs": _replace(a["exp_avgs"], 3, torch.zeros(27, 19))}, ValueError,
                      r"exp_avgs\[3\] must have the shape of weight2 \[27, 20\], got \[27, 19\]"),
    "exp_avg_sq-shape": (lambda a: {**a, "exp_avg_sqs": _replace(a["exp_avg_sqs"], 2, torch.zeros(21))},
                         ValueError, r"exp_avg_sqs\[2\] must have the shape of bias1 \[20\], got \[21\]"),
    "exp_avg-dtype": (lambda a: {**a, "exp_avgs": _replace(a["exp_avgs"], 1, a["exp_avgs"][1].double())},
                      TypeError, r"exp_avgs has dtype Double but weight1 has dtype Float; they must match"),
    "step-2-elements": (lambda a: {**a, "state_steps": _replace(a["state_steps"], 4, torch.ones(2))}, ValueError,
                        r"state_steps\[4\] must hold one step count, got shape \[2\]"),
    "beta1-1": (lambda a: {**a, "beta1": 1.0}, ValueError, r"beta1 must be in \[0, 1\), got 1"),
    "beta2-negative": (lambda a: {**a, "beta2": -0.1}, ValueError, r"beta2 must be in \[0, 1\), got -0.1"),
    "eps-negative": (lambda a: {**a, "eps": -1.0}, ValueError, r"eps must be finite and >= 0, got -1"),
    "weight_decay-nan": (lambda a: {**a, "weight_decay": float("nan")}, ValueError,
                         r"weight_decay must be finite and >= 0, got nan"),
    "inf-lr": (lambda a: {**a, "lr": [0.01, float("inf"), 0.01]}, ValueError, r"lr\[1\] must be finite, got inf"),
    "too-few-lrs": (lambda a: {**a, "lr": [0.01, 0.01]}, ValueError,
                    r"lr must hold one learning rate per step \(K = 3\), got 2"),
    "too-many-lrs": (lambda a: {**a, "lr": [0.01] * 4}, ValueError,
                     r"lr must hold one learning rate per step \(K = 3\), got 4"),
    "idx-2d": (lambda a: {**a, "idx": a["idx"][0]}, ValueError,
               r"idx must be 3-D \[K, B, T\] \(K steps of B rows\), got shape \[12, 3\]"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_and_change_nothing(case):
    """Each malformed call raises a clear exception (type and message) and changes no
    parameter and no optimizer state (every tensor compared with a clone)."""
    make_args, error, message = case
    model, opt = _warm_pair(ERR_SHAPE)
    B, T, V, _, _ = ERR_SHAPE
    idx, target = _batches(3, B, T, V)
    params, exp_avgs, exp_avg_sqs, steps = _state_lists(model, opt)
    good = dict(idx=idx, target=target, params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                state_steps=steps, lr=LRS[:3], beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8)
    args = make_args(good)
    positional = [args.pop(k) for k in list(good)[:7]]  # idx .. lr; the rest by keyword
    before = _snapshot(model, opt)
    with pytest.raises(error, match="^charmlp: " + message):
        with torch.no_grad():
            ops.mlp_adamw_steps(*positional, **args)
    assert_all_bitwise(_all_tensors(model, opt), before)


# --------------------------------------------------------------------------------------
# 5. opcheck, torch.compile
# --------------------------------------------------------------------------------------


def _op_args(model, opt, idx, target, lrs):
    g = opt.param_groups[0]
    return (idx, target, *_state_lists(model, opt), lrs, *g["betas"], g["weight_decay"], g["eps"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(dtype):
    """The schema (four mutated lists), fake kernel and dispatch registrations are
    consistent: every default opcheck sub-test."""
    model, opt = _warm_pair(ERR_SHAPE, dtype, **HYPER["custom"])
    B, T, V, _, _ = ERR_SHAPE
    idx, target = _batches(2, B, T, V)
    torch.library.opcheck(torch.ops.charmlp.mlp_adamw_steps.default, _op_args(model, opt, idx, target, LRS[:2]))


def test_torch_compile_fullgraph_matches_eager():
    """A function calling ops.mlp_adamw_steps compiles with fullgraph=True, and its losses
    and in-place updates (parameters, exp_avg, exp_avg_sq, step) are bitwise the eager op's."""
    B, T, V, _, _ = ERR_SHAPE
    idx, target = _batches(3, B, T, V, seed=4)
    eager, compiled_pair = _warm_pair(ERR_SHAPE, **HYPER["custom"]), _warm_pair(ERR_SHAPE, **HYPER["custom"])
    start = _snapshot(*compiled_pair)
    hyper = _hyper_kwargs(compiled_pair[1])

    def run(i, t, params, exp_avgs, exp_avg_sqs, steps):
        return ops.mlp_adamw_steps(i, t, params, exp_avgs, exp_avg_sqs, steps, LRS[:3], **hyper)

    compiled = torch.compile(run, fullgraph=True)
    with torch.no_grad():
        losses = compiled(idx, target, *_state_lists(*compiled_pair))
    assert_bitwise(losses, _op_steps(*eager, idx, target, LRS[:3]))
    after = _all_tensors(*compiled_pair)
    assert_all_bitwise(after, _all_tensors(*eager))
    assert all(not torch.equal(a, s) for a, s in zip(after, start))  # every tensor was updated in place


# --------------------------------------------------------------------------------------
# 6. charmlp.train: the chunked AdamW path == the per-step path
# --------------------------------------------------------------------------------------

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture
def restore_threads():
    """train(threads=1) sets torch's thread count for the process: restore it after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _adamw_config(steps=250):
    # eval/checkpoint cadences that split the 64-step chunks at odd places; the step
    # schedule's lr drop (at steps/2) falls inside a chunk.
    return TrainConfig(optimizer="adamw", steps=steps, hidden=48, threads=1, eval_every=70,
                       checkpoint_every=90, num_samples=2)


def _crash_on_draw(monkeypatch, n):
    """Makes the n-th minibatch draw of train() raise (a crash after the checkpoints so far)."""
    real, count = train_mod.draw_batches, [0]

    def draw(*args, **kw):
        count[0] += 1
        if count[0] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "draw_batches", draw)


def _run(cfg, run_dir, monkeypatch, per_step, crash_on_draw=None):
    """Trains (optionally crashing on the given minibatch draw, then resuming from the last
    checkpoint); returns the results, every step's exact (step, lr, loss) as logged (the
    crashed run's included), and the number of mlp_adamw_steps calls."""
    calls = _count_op_steps(monkeypatch)
    logged = []
    real_log_steps = train_mod._RunFiles.log_steps

    def log_steps(self, first_step, lrs, losses):
        logged.extend((first_step + i, lr, loss) for i, (lr, loss) in enumerate(zip(lrs, losses)))
        return real_log_steps(self, first_step, lrs, losses)

    monkeypatch.setattr(train_mod._RunFiles, "log_steps", log_steps)
    if per_step:
        monkeypatch.setattr(DirectFusedAdamW, "fits", lambda self, model: False)
    if crash_on_draw is not None:
        with monkeypatch.context() as crash:
            _crash_on_draw(crash, crash_on_draw)
            with pytest.raises(RuntimeError, match="simulated crash"):
                train(cfg, run_dir, **QUIET)
        resumed_at = load_checkpoint(run_dir)["step"]
        assert 0 < resumed_at < cfg.steps
        logged[:] = [row for row in logged if row[0] < resumed_at]  # (the resumed run redoes the rest)
        res = train(None, resume=run_dir, **QUIET)
    else:
        res = train(cfg, run_dir, **QUIET)
    monkeypatch.undo()
    return res, logged, len(calls)


def _assert_same_tree(a, b, path="checkpoint"):
    """Nested dicts/lists equal, tensors bitwise (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        if a.is_floating_point():
            assert_bitwise(a, b)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# Chunks end at 64, 70, 90 (checkpoint), 140, ...: the 4th draw comes after the checkpoint
# at step 90, so a crash there resumes from step 90 with the optimizer state loaded.
@pytest.mark.parametrize("crash_on_draw", [None, 4], ids=["one-run", "crash-and-resume"])
def test_train_adamw_chunked_path_matches_per_step_path(tmp_path, monkeypatch, restore_threads, crash_on_draw):
    """train(optimizer="adamw") through DirectFusedAdamW.steps (whole chunks per op call)
    gives exactly the per-step path's run (fits() forced False): every step's loss and lr,
    the final losses, and bitwise the same checkpoint (model, optimizer state, batch generator). Also
    when the chunked run crashes and resumes from a checkpoint (DirectFusedAdamW then binds
    the optimizer state loaded with load_state_dict)."""
    cfg = _adamw_config()
    chunked, chunked_log, chunked_calls = _run(cfg, tmp_path / "chunked", monkeypatch, per_step=False,
                                               crash_on_draw=crash_on_draw)
    per_step, per_step_log, per_step_calls = _run(cfg, tmp_path / "per_step", monkeypatch, per_step=True)
    assert chunked_calls > 3 and per_step_calls == 0  # each path was the one meant
    assert [s for s, _, _ in chunked_log] == list(range(cfg.steps))
    assert chunked_log == per_step_log
    assert len({lr for _, lr, _ in chunked_log}) == 2  # (the step schedule's drop happened)
    assert chunked["losses"] == per_step["losses"]
    a, b = load_checkpoint(tmp_path / "chunked"), load_checkpoint(tmp_path / "per_step")
    assert a["step"] == b["step"] == cfg.steps
    for key in ("model", "optimizer"):
        _assert_same_tree(a[key], b[key], key)
    _assert_same_tree(a["rng"]["batch"], b["rng"]["batch"], "batch rng")  # (not the global RNGs:
    # building a model draws from torch's, so they differ between two runs in one process)
    assert a["optimizer"]["state"]["state"][0]["step"].item() == cfg.steps
