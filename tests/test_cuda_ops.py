"""The CUDA kernels of every charmlp op, against plain PyTorch (charmlp.reference).

Skipped as a whole when there is no GPU or the extension was built without CUDA
(tools/check_cuda_build.sh compile-checks the kernels on machines without a GPU;
tools/gpu_check.sh runs this file on one).

Covers: values and every gradient vs the reference (several shapes incl. odd ones
and both the fused small-vocabulary and the generic paths; float32, float64,
bfloat16, float16; int64 and int32 indices), empty batches, large logits, gradcheck
in float64 (both first-layer algorithms), torch.library.opcheck,
torch.compile(fullgraph=True), CUDA-graph capture of a training step (the fused
mlp_sgd_step, K steps of mlp_sgd_steps and an autograd step), deterministic mode bitwise equal across runs
(the generic cuBLAS linear_cross_entropy path included), and bad indices raising
IndexError without touching memory or parameters (CHARMLP_CUDA_INDEX_CHECK=sync
and async).

The cases, their inputs and the tolerances are tests/_cuda_cases.py's, shared with
tests/test_cuda_emulated.py (the same kernel sources run on the CPU).

Run time on an H200: about a minute (the torch.compile test is most of it).
"""

from __future__ import annotations

import os

# Deterministic-mode tests call cuBLAS (generic paths, reference ops); torch refuses
# cuBLAS under use_deterministic_algorithms(True) without this.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
import torch.nn.functional as F

import charmlp
from _cuda_cases import (CE_SHAPES, CE_SHAPES_GPU_ONLY, DTYPE_IDS, DTYPES, ELT_SHAPES, ELT_SHAPES_GPU_ONLY,
                         LCE_SHAPES, LCE_SHAPES_GPU_ONLY, MLP_SHAPES, MLP_SHAPES_GPU_ONLY, REDUCTIONS, ce_inputs,
                         elt_inputs, lce_inputs, mlp_batch, mlp_params)
from _cuda_cases import assert_close_to_reference as _close
from charmlp import _C, ops, reference

OPS = ops.op_names()  # every op must have a CUDA kernel


def _cuda_kernels_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    return all(torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"charmlp::{op}", "CUDA") for op in OPS)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_kernels_ready(), reason="needs a CUDA device and charmlp's CUDA kernels"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_stale_index_error():
    """Clears an index error a failed test may have left recorded on the device (say,
    after a captured graph replayed bad indices), so it cannot make the next test raise."""
    yield
    try:
        ops.cross_entropy(torch.zeros(1, 2, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV))
    except IndexError:
        pass


def _leaf(t, dtype):
    return t.to(device=DEV, dtype=dtype).detach().requires_grad_()


# ----------------------------------------------------------------------------------------
# embed_linear_tanh
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ELT_SHAPES + ELT_SHAPES_GPU_ONLY, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_embed_linear_tanh_matches_reference(shape, dtype, with_bias, embed_algorithm):
    """Both CUDA algorithms (direct tiled GEMMs, folded gather/scatter) and the auto choice."""
    idx, table, weight, bias, grad_out = elt_inputs(*shape)
    idx = idx.to(DEV)
    params = [_leaf(table, dtype), _leaf(weight, dtype)] + ([_leaf(bias, dtype)] if with_bias else [])
    out = ops.embed_linear_tanh(idx, *params, *([] if with_bias else [None]))
    assert out.dtype == dtype and out.shape == (shape[0], shape[4])
    grads = torch.autograd.grad(out, params, grad_out.to(DEV, dtype))

    # Reference in float64 from the very same (rounded) parameter values.
    ref_params = [_leaf(p.detach(), torch.float64) for p in params]
    ref = reference.embed_linear_tanh(idx, *ref_params, *([] if with_bias else [None]))
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out.to(DEV, dtype).double())
    _close(out, ref, dtype, "out")
    for name, gr, rg in zip(["table", "weight", "bias"], grads, ref_grads):
        assert gr.dtype == dtype
        _close(gr, rg, dtype, f"grad_{name}")


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_embed_linear_tanh_int32_and_noncontiguous(idx_dtype):
    idx, table, weight, bias, grad_out = elt_inputs(50, 3, 27, 10, 64, idx_dtype=idx_dtype)
    # Non-contiguous operands: a transposed weight view and a strided idx.
    idx_nc = torch.cat([idx, idx], dim=1).to(DEV)[:, ::2]
    w_nc = weight.t().contiguous().to(DEV).t()
    out = ops.embed_linear_tanh(idx_nc, table.to(DEV), w_nc, bias.to(DEV))
    ref = reference.embed_linear_tanh(idx_nc, table.to(DEV), w_nc, bias.to(DEV))
    _close(out, ref, torch.float64, "out")


def test_embed_linear_tanh_backward_op_direct():
    idx, table, weight, bias, grad_out = elt_inputs(33, 3, 27, 10, 40)
    idx, table, weight, bias, grad_out = (t.to(DEV) for t in (idx, table, weight, bias, grad_out))
    out = ops.embed_linear_tanh(idx, table, weight, bias)
    g_table, g_weight, g_bias = torch.ops.charmlp.embed_linear_tanh_backward(grad_out, out, idx, table, weight)
    ref_params = [_leaf(p, torch.float64) for p in (table, weight, bias)]
    ref = reference.embed_linear_tanh(idx, *ref_params)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out)
    for gr, rg in zip((g_table, g_weight, g_bias), ref_grads):
        _close(gr, rg, torch.float64)


# ----------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------

def _ce_check(fn_ours, fn_ref, leaves, target, dtype, reduction, **kw):
    loss = fn_ours(*leaves, target, reduction=reduction, **kw)
    assert loss.dtype == dtype
    grad_loss = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=DEV).reshape(loss.shape)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad_loss.to(dtype))
    ref_leaves = [None if t is None else _leaf(t.detach(), torch.float64) for t in leaves]
    ref = fn_ref(*ref_leaves, target, reduction=reduction, **kw)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], grad_loss.to(dtype).double())
    _close(loss, ref, dtype, "loss")
    for i, (gr, rg) in enumerate(zip(grads, ref_grads)):
        _close(gr, rg, dtype, f"grad {i}")


@pytest.mark.parametrize("shape", CE_SHAPES + CE_SHAPES_GPU_ONLY, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(shape, dtype, reduction, label_smoothing):
    logits, target = ce_inputs(*shape)
    _ce_check(ops.cross_entropy, reference.cross_entropy, [_leaf(logits, dtype)], target.to(DEV), dtype, reduction,
              label_smoothing=label_smoothing)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4])
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
def test_cross_entropy_ignore_index_and_int32(ignore_index, target_dtype):
    logits, target = ce_inputs(50, 5, ignore_frac=0.3, ignore_index=ignore_index)
    for reduction in REDUCTIONS:
        loss = ops.cross_entropy(logits.to(DEV), target.to(DEV, target_dtype), reduction=reduction,
                                 ignore_index=ignore_index, label_smoothing=0.05)
        ref = reference.cross_entropy(logits.to(DEV), target.to(DEV), reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=0.05)
        _close(loss, ref, torch.float64, reduction)


def test_cross_entropy_lse_and_all_ignored():
    logits, target = ce_inputs(40, 27, ignore_frac=0.0)
    logits = logits.to(DEV)
    _loss, lse = torch.ops.charmlp.cross_entropy(logits, target.to(DEV), 1, -100, 0.0)
    _close(lse, torch.logsumexp(logits, dim=1), torch.float64, "lse")
    lse32 = torch.ops.charmlp.cross_entropy(logits.bfloat16(), target.to(DEV), 1, -100, 0.0)[1]
    assert lse32.dtype == torch.float32
    # All ignored: mean is nan like torch, sum is 0, gradients are 0.
    x = _leaf(logits, torch.float32)
    t = torch.full((40,), -100, device=DEV)
    assert torch.isnan(ops.cross_entropy(x, t, reduction="mean"))
    loss = ops.cross_entropy(x, t, reduction="sum")
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g) == 0


# ----------------------------------------------------------------------------------------
# linear_cross_entropy (fused V <= 32 path and generic cuBLAS path)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", LCE_SHAPES + LCE_SHAPES_GPU_ONLY, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_matches_reference(shape, dtype, reduction, with_bias):
    x, w, b, target = lce_inputs(*shape, seed=1, bias=with_bias)
    x = torch.tanh(x)  # the model's hidden states
    leaves = [_leaf(x, dtype), _leaf(w, dtype), None if b is None else _leaf(b, dtype)]
    for smoothing in (0.0, 0.1):
        _ce_check(ops.linear_cross_entropy, reference.linear_cross_entropy, leaves, target.to(DEV), dtype, reduction,
                  label_smoothing=smoothing)


def test_linear_cross_entropy_backward_always_returns_grad_bias():
    B, H, V = 10, 8, 27
    x, w = torch.randn(B, H, device=DEV), torch.randn(V, H, device=DEV)
    t = torch.randint(0, V, (B,), device=DEV)
    loss, lse = torch.ops.charmlp.linear_cross_entropy(x, w, None, t, 1, -100, 0.0)
    gi, gw, gb = torch.ops.charmlp.linear_cross_entropy_backward(torch.ones((), device=DEV), x, w, None, t, lse,
                                                                 1, -100, 0.0)
    logits = (x @ w.T).requires_grad_()
    (gl,) = torch.autograd.grad(reference.cross_entropy(logits, t), logits)
    _close(gb, gl.sum(0), torch.float32, "grad_bias")


# ----------------------------------------------------------------------------------------
# mlp_sgd_step (fused single-block path and general path)
# ----------------------------------------------------------------------------------------


def _reference_step(idx, target, params, lr):
    """In float64 from the very same (rounded) parameter values."""
    return reference.mlp_sgd_step(idx, target, params, lr, dtype=torch.float64)


def _step_params(V, T, E, H, dtype, seed=0):
    return mlp_params(V, T, E, H, dtype, seed, device=DEV)


@pytest.mark.parametrize("shape", MLP_SHAPES + MLP_SHAPES_GPU_ONLY, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_mlp_sgd_step_matches_reference(shape, dtype, idx_dtype, embed_algorithm):
    B, T, V, E, H = shape
    idx, target = (t.to(DEV, idx_dtype) for t in mlp_batch(B, T, V, seed=3))
    params = _step_params(V, T, E, H, dtype)
    lr = 0.1
    ref_loss, ref_params = _reference_step(idx, target, params, lr)
    loss = ops.mlp_sgd_step(idx, target, *params, lr)
    assert loss.dtype == dtype and loss.shape == ()
    _close(loss, ref_loss, dtype, "loss")
    for name, p, rp in zip(["table", "weight1", "bias1", "weight2", "bias2"], params, ref_params):
        _close(p, rp, dtype, name)


@pytest.mark.parametrize("B", [32, 300], ids=["fused", "general"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_mlp_sgd_step_low_precision(B, dtype):
    """bfloat16/float16 parameters (float32 accumulation); the loss has the parameters'
    dtype like the fake kernel says."""
    V, T, E, H = 27, 3, 10, 200
    idx, target = (t.to(DEV) for t in mlp_batch(B, T, V, seed=4))
    params = _step_params(V, T, E, H, dtype)
    ref_loss, ref_params = _reference_step(idx, target, params, 0.1)
    loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
    assert loss.dtype == dtype and loss.shape == ()
    _close(loss, ref_loss, dtype, "loss")
    for name, p, rp in zip(["table", "weight1", "bias1", "weight2", "bias2"], params, ref_params):
        assert p.dtype == dtype
        _close(p, rp, dtype, name)


def test_mlp_sgd_step_noncontiguous_params_are_updated():
    V, T, E, H = 27, 3, 10, 64
    params = _step_params(V, T, E, H, torch.float32)
    w1_t = params[1].t().contiguous()  # [T*E, H]; pass its transpose view (non-contiguous)
    params_nc = [params[0], w1_t.t(), params[2], params[3], params[4]]
    idx = torch.randint(0, V, (32, T), device=DEV)
    target = torch.randint(0, V, (32,), device=DEV)
    ref_loss, ref_params = _reference_step(idx, target, params_nc, 0.1)
    ops.mlp_sgd_step(idx, target, *params_nc, 0.1)
    _close(params_nc[1], ref_params[1], torch.float32, "weight1 (non-contiguous)")


# ----------------------------------------------------------------------------------------
# mlp_sgd_steps (K steps from one host call)
# ----------------------------------------------------------------------------------------


def _steps_batch(K, B, T, V, seed=5):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (K, B, T), generator=g)
    target = torch.randint(0, V, (K, B), generator=g)
    target[1, ::3] = -100
    target[2] = -100  # a step with every target ignored: NaN loss, no update
    return idx.to(DEV), target.to(DEV)


@pytest.mark.parametrize("B", [32, 300], ids=["fused", "general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_mlp_sgd_steps_equal_single_steps(B, dtype):
    """Step k of one call is bitwise mlp_sgd_step(idx[k], target[k], ..., lr[k]): the same
    kernels on the same stream (deterministic mode: the general path's table gradient
    would otherwise use atomics)."""
    V, T, E, H, K = 27, 3, 10, 200, 5
    idx, target = _steps_batch(K, B, T, V)
    lrs = [0.1, 0.05, 0.2, 0.1, 0.01]
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _step_params(V, T, E, H, dtype)
        b = [p.clone() for p in a]
        losses = ops.mlp_sgd_steps(idx, target, *a, lrs)
        ref = torch.stack([ops.mlp_sgd_step(idx[k], target[k], *b, lrs[k]) for k in range(K)])
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    assert losses.shape == (K,) and losses.dtype == dtype
    assert torch.isnan(losses[2]) and torch.equal(losses.isnan(), ref.isnan())
    assert torch.equal(losses.nan_to_num(), ref.nan_to_num())
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("B", [32, 300], ids=["fused", "general"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_mlp_sgd_steps_low_precision(B, dtype):
    """bfloat16/float16 parameters: the losses have their dtype; close to single steps."""
    V, T, E, H, K = 27, 3, 10, 200, 3
    idx, target = _steps_batch(K, B, T, V, seed=8)
    a = _step_params(V, T, E, H, dtype)
    b = [p.clone() for p in a]
    losses = ops.mlp_sgd_steps(idx, target, *a, 0.1)
    ref = torch.stack([ops.mlp_sgd_step(idx[k], target[k], *b, 0.1) for k in range(K)])
    assert losses.dtype == dtype and losses.shape == (K,)
    assert torch.equal(losses.isnan(), ref.isnan())
    _close(losses.nan_to_num(), ref.nan_to_num(), dtype, "losses")
    for name, p, q in zip(["table", "weight1", "bias1", "weight2", "bias2"], a, b):
        assert p.dtype == dtype
        _close(p, q, dtype, name)


@pytest.mark.parametrize("B", [32, 300], ids=["fused", "general"])
def test_mlp_sgd_steps_matches_reference(B):
    V, T, E, H, K = 27, 3, 10, 200, 3
    idx, target = _steps_batch(K, B, T, V, seed=6)
    target[2] = torch.randint(0, V, (B,), device=DEV)
    params = _step_params(V, T, E, H, torch.float64)
    ref_params = [p.clone() for p in params]
    losses = ops.mlp_sgd_steps(idx, target, *params, 0.1)
    for k in range(K):
        ref_loss, ref_params = _reference_step(idx[k], target[k], ref_params, 0.1)
        _close(losses[k], ref_loss, torch.float64, f"loss {k}")
    for name, p, rp in zip(["table", "weight1", "bias1", "weight2", "bias2"], params, ref_params):
        _close(p, rp, torch.float64, name)


@pytest.mark.parametrize("B", [32, 300], ids=["fused", "general"])
def test_mlp_sgd_steps_bad_index_in_a_later_step_changes_nothing(B):
    """Every index is checked before the first step: an error in the last step raises at
    its flat position in the whole [K, B, T] / [K, B] tensor, and no step is applied."""
    V, T, E, H, K = 27, 3, 10, 200, 4
    idx, target = _steps_batch(K, B, T, V)
    params = _step_params(V, T, E, H, torch.float32)
    before = [p.clone() for p in params]
    bad_idx = idx.clone()
    bad_idx[K - 1, 2, 1] = V + 3
    pos = (K - 1) * B * T + 2 * T + 1
    with pytest.raises(IndexError, match=rf"charmlp: idx contains {V + 3} at flat position {pos},"):
        ops.mlp_sgd_steps(bad_idx, target, *params, 0.1)
    bad_target = target.clone()
    bad_target[K - 1, 4] = -7
    with pytest.raises(IndexError, match=rf"charmlp: target contains -7 at flat position {(K - 1) * B + 4},"):
        ops.mlp_sgd_steps(idx, bad_target, *params, 0.1)
    torch.cuda.synchronize()
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    ops.mlp_sgd_steps(idx, target, *params, 0.1)  # the record was reset: a good call runs


def test_mlp_sgd_steps_empty_and_noncontiguous():
    V, T, E, H = 27, 3, 10, 64
    params = _step_params(V, T, E, H, torch.float32)
    before = [p.clone() for p in params]
    assert ops.mlp_sgd_steps(torch.zeros(0, 32, T, dtype=torch.long, device=DEV),
                             torch.zeros(0, 32, dtype=torch.long, device=DEV), *params, []).shape == (0,)
    empty = ops.mlp_sgd_steps(torch.zeros(2, 0, T, dtype=torch.long, device=DEV),
                              torch.zeros(2, 0, dtype=torch.long, device=DEV), *params, [0.1, 0.1])
    assert empty.shape == (2,) and torch.isnan(empty).all()
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    # A non-contiguous weight1 is updated in place like the contiguous one, and int32 or
    # non-contiguous index tensors give the int64 result.
    idx, target = _steps_batch(3, 32, T, V)
    contiguous = [p.clone() for p in params]
    params_nc = [params[0], params[1].t().contiguous().t(), params[2], params[3], params[4]]
    ops.mlp_sgd_steps(idx, target, *params_nc, 0.1)
    ops.mlp_sgd_steps(idx, target, *contiguous, 0.1)
    assert not params_nc[1].is_contiguous()
    for a, b in zip(params_nc, contiguous):
        assert torch.equal(a, b)
    idx_nc = idx.transpose(0, 1).contiguous().transpose(0, 1)
    target_nc = target.t().contiguous().t()
    assert not idx_nc.is_contiguous() and not target_nc.is_contiguous()
    for i, t in ((idx.int(), target.int()), (idx_nc, target_nc)):
        other = [p.clone() for p in params]
        want = [p.clone() for p in params]
        assert torch.equal(ops.mlp_sgd_steps(i, t, *other, 0.1).nan_to_num(),
                           ops.mlp_sgd_steps(idx, target, *want, 0.1).nan_to_num())
        for a, b in zip(other, want):
            assert torch.equal(a, b)


def test_cuda_graph_k_steps():
    """K steps captured once and replayed on new batches == eager calls."""
    V, T, E, H, K, B = 27, 3, 10, 200, 4, 32
    params = _step_params(V, T, E, H, torch.float32)
    static_idx, static_y = _steps_batch(K, B, T, V)
    lrs = [0.1, 0.1, 0.05, 0.05]
    _warmup(lambda: ops.mlp_sgd_steps(static_idx, static_y, *params, lrs))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = ops.mlp_sgd_steps(static_idx, static_y, *params, lrs)
    eager = [p.clone() for p in params]
    for rnd in range(2):
        idx, y = _steps_batch(K, B, T, V, seed=10 + rnd)
        static_idx.copy_(idx)
        static_y.copy_(y)
        graph.replay()
        ref = ops.mlp_sgd_steps(idx, y, *eager, lrs)
        torch.cuda.synchronize()
        assert torch.equal(static_losses.isnan(), ref.isnan())
        _close(static_losses.nan_to_num(), ref.nan_to_num(), torch.float32, f"losses round {rnd}")
        for a, b in zip(params, eager):
            _close(a, b, torch.float32, f"params round {rnd}")

    # A bad index in the last step of a replay: no step is applied (only the device-side
    # skip protects the parameters here), and the next op outside the graph raises it.
    before = [p.clone() for p in params]
    static_idx[K - 1, 0, 0] = V + 5
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match=rf"idx contains {V + 5} at flat position {(K - 1) * B * T},"):
        ops.cross_entropy(torch.randn(4, V, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV))


# ----------------------------------------------------------------------------------------
# mlp_cross_entropy (the whole model's loss; its forward computes the gradients)
# ----------------------------------------------------------------------------------------


def _reference_loss_and_grads(idx, target, params):
    """In float64 from the very same (rounded) parameter values."""
    return reference.mlp_loss_and_grads(idx, target, params, dtype=torch.float64)


@pytest.mark.parametrize("shape", MLP_SHAPES + MLP_SHAPES_GPU_ONLY, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_mlp_cross_entropy_matches_reference(shape, dtype, idx_dtype):
    B, T, V, E, H = shape
    idx, target = (t.to(DEV, idx_dtype) for t in mlp_batch(B, T, V, seed=5))
    params = [p.requires_grad_() for p in _step_params(V, T, E, H, dtype)]
    ref_loss, ref_grads = _reference_loss_and_grads(idx, target, params)
    loss = ops.mlp_cross_entropy(idx, target, *params)
    assert loss.dtype == dtype and loss.shape == ()
    _close(loss, ref_loss, dtype, "loss")
    grads = torch.autograd.grad(2.0 * loss, params)
    for name, gr, rg in zip(["table", "weight1", "bias1", "weight2", "bias2"], grads, ref_grads):
        assert gr.dtype == dtype and gr.shape == rg.shape
        _close(gr, 2.0 * rg, dtype, f"grad {name}")
    with torch.no_grad():  # the loss-only path
        _close(ops.mlp_cross_entropy(idx, target, *params), ref_loss, dtype, "no-grad loss")
    loss, *grads = torch.ops.charmlp.mlp_cross_entropy_and_grads(idx, target, *[p.detach() for p in params])
    for name, gr, rg in zip(["table", "weight1", "bias1", "weight2", "bias2"], grads, ref_grads):
        _close(gr, rg, dtype, f"grad {name} (and_grads op)")


def test_mlp_cross_entropy_noncontiguous_params_and_double_backward():
    V, T, E, H = 27, 3, 10, 64
    params = _step_params(V, T, E, H, torch.float32)
    w1 = params[1].t().contiguous().t().requires_grad_()  # a non-contiguous view
    ps = [params[0].requires_grad_(), w1, params[2].requires_grad_(), params[3].requires_grad_(),
          params[4].requires_grad_()]
    idx = torch.randint(0, V, (32, T), device=DEV)
    target = torch.randint(0, V, (32,), device=DEV)
    ref_loss, ref_grads = _reference_loss_and_grads(idx, target, ps)
    loss = ops.mlp_cross_entropy(idx, target, *ps)
    for gr, rg in zip(torch.autograd.grad(loss, ps, retain_graph=True), ref_grads):
        _close(gr, rg, torch.float32, "grad (non-contiguous weight1)")
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, ps, create_graph=True)


def test_model_fused_matches_unfused_on_cuda():
    torch.manual_seed(0)
    fused = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=True, device=DEV)
    plain = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=False, device=DEV)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 27, (32, 3), device=DEV)
    y = torch.randint(0, 27, (32,), device=DEV)
    _close(fused(idx, y)[1], plain(idx, y)[1], torch.float32, "loss")
    # forward_backward: .grad from mlp_cross_entropy_and_grads, no autograd graph
    lf = fused.forward_backward(idx, y)
    plain.zero_grad(set_to_none=True)
    lp = plain(idx, y, return_logits=False)[1]
    lp.backward()
    _close(lf, lp, torch.float32, "forward_backward loss")
    for (n, a), b in zip(fused.named_parameters(), plain.parameters()):
        _close(a.grad, b.grad, torch.float32, f"grad {n}")
    for _ in range(3):
        lf = fused.sgd_step(idx, y, 0.1)
        lp = plain.sgd_step(idx, y, 0.1)
        _close(lf, lp, torch.float32, "sgd loss")
    for (n, a), b in zip(fused.named_parameters(), plain.parameters()):
        _close(a, b, torch.float32, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B", [32, 300])
def test_idiomatic_loop_on_cuda(dtype, B):
    """logits, loss = model(x, y) (mlp_logits_cross_entropy) with an extra loss on the
    logits: the logits, the loss and every gradient as plain PyTorch's."""
    torch.manual_seed(0)
    fused = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=True, device=DEV, dtype=dtype)
    plain = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=False, device=DEV, dtype=dtype)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 27, (B, 3), device=DEV)
    y = torch.randint(0, 27, (B,), device=DEV)
    lf, Lf = fused(idx, y)
    lp, Lp = plain(idx, y)
    _close(lf, lp, dtype, "logits")
    _close(Lf, Lp, dtype, "loss")
    (Lf + 0.01 * lf.float().pow(2).mean()).backward()
    (Lp + 0.01 * lp.float().pow(2).mean()).backward()
    for (n, a), b in zip(fused.named_parameters(), plain.parameters()):
        _close(a.grad, b.grad, dtype, f"grad {n}")
    bad = idx.clone()
    bad[3, 1] = 27
    with pytest.raises(IndexError, match="idx"):
        fused(bad, y)[1].backward()


# ----------------------------------------------------------------------------------------
# Empty batches, all-ignored batches, large logits
# ----------------------------------------------------------------------------------------


def test_empty_batches(embed_algorithm):
    """B = 0 for every op: no kernel may be launched with an empty grid."""
    V, T, E, H = 27, 3, 10, 20
    idx = torch.zeros(0, T, dtype=torch.long, device=DEV)
    table = torch.randn(V, E, device=DEV, requires_grad=True)
    w1 = torch.randn(H, T * E, device=DEV, requires_grad=True)
    b1 = torch.randn(H, device=DEV, requires_grad=True)
    out = ops.embed_linear_tanh(idx, table, w1, b1)
    assert out.shape == (0, H)
    grads = torch.autograd.grad(out.sum(), [table, w1, b1])
    assert all(g.abs().sum() == 0 for g in grads)

    target = torch.zeros(0, dtype=torch.long, device=DEV)
    for red in ("mean", "sum", "none"):
        logits = torch.randn(0, V, device=DEV)
        _close(ops.cross_entropy(logits, target, reduction=red),
               reference.cross_entropy(logits, target, reduction=red), torch.float32, f"cross_entropy {red}")
        for Vo in (V, 40):  # fused and generic linear_cross_entropy
            x = torch.randn(0, H, device=DEV, requires_grad=True)
            w2 = torch.randn(Vo, H, device=DEV, requires_grad=True)
            b2 = torch.randn(Vo, device=DEV, requires_grad=True)
            loss = ops.linear_cross_entropy(x, w2, b2, target, reduction=red)
            ref = reference.linear_cross_entropy(x, w2, b2, target, reduction=red)
            assert loss.shape == ref.shape
            _close(loss, ref, torch.float32, f"linear_cross_entropy V={Vo} {red}")
            if red != "mean":  # (mean: nan, like torch)
                gx, gw, gb = torch.autograd.grad(loss.sum(), [x, w2, b2])
                assert gx.shape == (0, H) and gw.abs().sum() == 0 and gb.abs().sum() == 0

    params = _step_params(V, T, E, H, torch.float32)
    loss, *grads = torch.ops.charmlp.mlp_cross_entropy_and_grads(idx, target, *params)
    assert torch.isnan(loss) and all(g.shape == p.shape and not g.any() for g, p in zip(grads, params))
    assert torch.isnan(ops.mlp_cross_entropy(idx, target, *params))
    before = [p.clone() for p in params]
    loss = ops.mlp_sgd_step(idx, target, *params, 0.1)
    assert torch.isnan(loss)  # the mean over no rows, as F.cross_entropy
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("V", [27, 40], ids=["fused", "generic"])
def test_linear_cross_entropy_noncontiguous_inputs(V):
    """Strided/transposed views of every operand (and of cross_entropy's logits), int32 targets."""
    g = torch.Generator().manual_seed(11)
    x_big = torch.randn(40, 24, generator=g, dtype=torch.float64).to(DEV)
    x = x_big[::2, 1:17]                                        # [20, 16], strided rows, offset
    w = torch.randn(16, V, generator=g, dtype=torch.float64).to(DEV).t()  # [V, 16] transposed
    b = torch.randn(2 * V, generator=g, dtype=torch.float64).to(DEV)[::2]  # strided
    t = torch.randint(0, V, (40,), generator=g).to(DEV, torch.int32)[::2]
    ref = reference.linear_cross_entropy(x, w, b, t, label_smoothing=0.1)
    _close(ops.linear_cross_entropy(x, w, b, t, label_smoothing=0.1), ref, torch.float64, "linear_cross_entropy")
    logits = F.linear(x, w, b).t().contiguous().t()            # column-major [20, V]
    _close(ops.cross_entropy(logits, t, label_smoothing=0.1), ref, torch.float64, "cross_entropy")


@pytest.mark.parametrize("V", [27, 40], ids=["fused", "generic"])
def test_linear_cross_entropy_all_ignored(V):
    x = torch.randn(5, 8, device=DEV, requires_grad=True)
    w = torch.randn(V, 8, device=DEV, requires_grad=True)
    b = torch.randn(V, device=DEV, requires_grad=True)
    t = torch.full((5,), -100, device=DEV)
    assert torch.isnan(ops.linear_cross_entropy(x, w, b, t))
    loss = ops.linear_cross_entropy(x, w, b, t, reduction="sum")
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, [x, w, b]))


@pytest.mark.parametrize("scale", [1e2, 1e3])
def test_large_logits_are_stable(scale):
    """The max is subtracted before exp (which overflows float32 from 89 on): finite and
    correct losses and gradients at logits of order 1e2-1e3. The tolerance is float32's
    at that magnitude: lse itself is rounded to ~1e-4 there, which moves a softmax."""
    g = torch.Generator().manual_seed(9)

    def check(fn, ref_fn, leaves, target, **kw):
        loss = fn(*leaves, target, **kw)
        grads = torch.autograd.grad(loss, leaves)
        ref_leaves = [_leaf(t.detach(), torch.float64) for t in leaves]
        ref = ref_fn(*ref_leaves, target, **kw)
        ref_grads = torch.autograd.grad(ref, ref_leaves)
        for what, a, e in [("loss", loss, ref)] + [(f"grad {i}", a, e) for i, (a, e) in enumerate(zip(grads, ref_grads))]:
            assert torch.isfinite(a).all(), what
            scale_e = max(1.0, e.abs().max().item())
            torch.testing.assert_close(a.double(), e, rtol=1e-3, atol=1e-3 * scale_e, msg=lambda m: f"{what}: {m}")

    logits = scale * torch.randn(64, 27, generator=g, dtype=torch.float64)
    target = torch.randint(0, 27, (64,), generator=g).to(DEV)
    check(ops.cross_entropy, reference.cross_entropy, [_leaf(logits, torch.float32)], target, label_smoothing=0.1)

    for V in (27, 40):  # fused and generic paths
        # Coarse grids: the float32 logits are exact, whatever the summation order.
        x = torch.randint(-8, 9, (64, 16), generator=g).double() * (scale / 64)
        w = torch.randint(-4, 5, (V, 16), generator=g).double() / 4
        b = torch.randint(-3, 4, (V,), generator=g).double()
        t = torch.randint(0, V, (64,), generator=g).to(DEV)
        check(ops.linear_cross_entropy, reference.linear_cross_entropy,
              [_leaf(x, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)], t, reduction="sum")


# ----------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ----------------------------------------------------------------------------------------


def test_gradcheck_embed_linear_tanh_float64(embed_algorithm):
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 6, (5, 3), generator=g).to(DEV)
    table = torch.randn(6, 2, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    # nondet_tol: the direct algorithm accumulates repeated indices with atomics (the
    # summation order, so the last bits, may differ between two backward calls).
    assert torch.autograd.gradcheck(lambda t, w, b: ops.embed_linear_tanh(idx, t, w, b), (table, weight, bias),
                                    nondet_tol=1e-12)
    assert torch.autograd.gradcheck(lambda t, w: ops.embed_linear_tanh(idx, t, w, None), (table, weight),
                                    nondet_tol=1e-12)


def test_gradcheck_losses_float64():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    target = torch.tensor([0, 4, -100, 2, 1, 3], device=DEV)
    for red in ["mean", "sum", "none"]:
        assert torch.autograd.gradcheck(
            lambda x: ops.cross_entropy(x, target, reduction=red, label_smoothing=0.1), (logits,))

    for V in (5, 40):  # fused and generic paths
        x = torch.randn(6, 4, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
        w = torch.randn(V, 4, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
        b = torch.randn(V, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
        for red in ["mean", "none"]:
            assert torch.autograd.gradcheck(
                lambda x, w, b: ops.linear_cross_entropy(x, w, b, target, reduction=red, label_smoothing=0.1),
                (x, w, b))


def _opcheck_cases():
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    idx = torch.randint(0, 9, (6, 3), generator=g).to(DEV)
    target = torch.tensor([0, 4, -100, 2, 8, 3], device=DEV)
    table, w1, b1 = r(9, 4).requires_grad_(), r(5, 12).requires_grad_(), r(5).requires_grad_()
    h, w2, b2 = torch.tanh(r(6, 5)), r(9, 5), r(9)
    logits = r(6, 9)
    out = ops.embed_linear_tanh(idx, table, w1, b1).detach()
    _, lse = torch.ops.charmlp.cross_entropy(logits, target, 1, -100, 0.1)
    _, lse2 = torch.ops.charmlp.linear_cross_entropy(h, w2, b2, target, 1, -100, 0.1)
    w40, b40 = r(40, 5), r(40)
    _, lse40 = torch.ops.charmlp.linear_cross_entropy(h, w40, b40, target, 1, -100, 0.1)
    P = torch.ops.charmlp
    return [
        (P.embed_linear_tanh.default, (idx, table, w1, b1)),
        (P.embed_linear_tanh.default, (idx, table, w1, None)),
        (P.embed_linear_tanh_backward.default, (r(6, 5), out, idx, table.detach(), w1.detach())),
        (P.cross_entropy.default, (logits.requires_grad_(), target, 1, -100, 0.1)),
        (P.cross_entropy.default, (logits, target, 0, -100, 0.0)),
        (P.cross_entropy_backward.default, (torch.ones((), device=DEV), logits.detach(), target, lse, 1, -100, 0.1)),
        (P.linear_cross_entropy.default, (h.requires_grad_(), w2.requires_grad_(), b2.requires_grad_(), target, 2, -100, 0.1)),
        (P.linear_cross_entropy_backward.default,
         (torch.ones((), device=DEV), h.detach(), w2.detach(), b2.detach(), target, lse2, 1, -100, 0.1)),
        (P.mlp_sgd_step.default,
         (idx, target, table.detach().clone(), w1.detach().clone(), b1.detach().clone(), r(9, 5), r(9), 0.1)),
        (P.mlp_sgd_steps.default,
         (torch.stack([idx, idx.flip(0)]), torch.stack([target, target.flip(0)]), table.detach().clone(),
          w1.detach().clone(), b1.detach().clone(), r(9, 5), r(9), [0.1, 0.05])),
        (P.cross_entropy_and_grads.default, (logits.detach(), target, 1, -100, 0.1)),
        (P.linear_cross_entropy_and_grads.default, (h.detach(), w2.detach(), b2.detach(), target, 1, -100, 0.1)),
        (P.linear_cross_entropy_and_grads.default, (h.detach(), w40.detach(), None, target, 2, -100, 0.0)),
        (P.mlp_cross_entropy.default,
         (idx, target, table.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_(),
          b1.detach().clone().requires_grad_(), r(9, 5).requires_grad_(), r(9).requires_grad_())),
        (P.mlp_cross_entropy_and_grads.default, (idx, target, table.detach(), w1.detach(), b1.detach(), r(9, 5), r(9))),
        # the generic (cuBLAS) linear_cross_entropy path: V > 32
        (P.linear_cross_entropy.default, (h, w40.requires_grad_(), b40.requires_grad_(), target, 1, -100, 0.1)),
        (P.linear_cross_entropy_backward.default,
         (torch.ones((), device=DEV), h.detach(), w40.detach(), b40.detach(), target, lse40, 1, -100, 0.1)),
    ]


@pytest.mark.parametrize("case", range(17))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# ----------------------------------------------------------------------------------------


def _compile_backend() -> str:
    """Inductor needs Triton for CUDA code; without it, aot_eager still traces the ops
    through their fake kernels and autograd (fullgraph) and runs them for real."""
    try:
        from torch.utils._triton import has_triton

        return "inductor" if has_triton() else "aot_eager"
    except ImportError:  # pragma: no cover
        return "inductor"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    backend = _compile_backend()
    torch.manual_seed(0)
    model = charmlp.MLPLanguageModel(27, 3, 10, 64, fused=True, device=DEV)
    idx = torch.randint(0, 27, (32, 3), device=DEV)
    y = torch.randint(0, 27, (32,), device=DEV)

    def loss_fn(idx, y):
        return model(idx, y, return_logits=False)[1]

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    eager_loss = loss_fn(idx, y)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    loss = compiled(idx, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    _close(loss, eager_loss, torch.float32, "loss")
    for a, b in zip(grads, eager_grads):
        _close(a, b, torch.float32, "grad")

    # The fused step (a mutating op) compiles too.
    params = _step_params(27, 3, 10, 64, torch.float32)
    ref_params = [p.clone() for p in params]
    step = torch.compile(lambda i, t, ps: ops.mlp_sgd_step(i, t, *ps, 0.1), fullgraph=True, backend=backend)
    l1 = step(idx, y, params)
    l2 = ops.mlp_sgd_step(idx, y, *ref_params, 0.1)
    _close(l1, l2, torch.float32, "compiled step loss")
    for a, b in zip(params, ref_params):
        _close(a, b, torch.float32, "compiled step params")

    # And K steps in one call.
    idx3, y3 = torch.stack([idx, idx.flip(0)]), torch.stack([y, y.flip(0)])
    steps = torch.compile(lambda i, t, ps: ops.mlp_sgd_steps(i, t, *ps, [0.1, 0.05]), fullgraph=True, backend=backend)
    l1 = steps(idx3, y3, params)
    l2 = ops.mlp_sgd_steps(idx3, y3, *ref_params, [0.1, 0.05])
    _close(l1, l2, torch.float32, "compiled steps losses")
    for a, b in zip(params, ref_params):
        _close(a, b, torch.float32, "compiled steps params")


def _warmup(fn, n=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@pytest.mark.parametrize("B", [32, 1000], ids=["fused", "general"])
def test_cuda_graph_fused_sgd_step(B):
    V, T, E, H = 27, 3, 10, 200
    params = _step_params(V, T, E, H, torch.float32)
    static_idx = torch.randint(0, V, (B, T), device=DEV)
    static_y = torch.randint(0, V, (B,), device=DEV)
    _warmup(lambda: ops.mlp_sgd_step(static_idx, static_y, *params, 0.1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = ops.mlp_sgd_step(static_idx, static_y, *params, 0.1)

    eager = [p.clone() for p in params]
    for step in range(3):
        idx = torch.randint(0, V, (B, T), device=DEV)
        y = torch.randint(0, V, (B,), device=DEV)
        static_idx.copy_(idx)
        static_y.copy_(y)
        graph.replay()
        ref_loss = ops.mlp_sgd_step(idx, y, *eager, 0.1)
        torch.cuda.synchronize()
        _close(static_loss, ref_loss, torch.float32, f"loss step {step}")
        for a, b in zip(params, eager):
            _close(a, b, torch.float32, f"params step {step}")

    # A bad index inside the graph: no memory corruption, parameters untouched, and
    # the next charmlp call outside the graph raises.
    before = [p.clone() for p in params]
    static_idx[0, 0] = V + 5
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="outside the valid range"):
        ops.cross_entropy(torch.randn(4, V, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV))
    # Reported once: the next call is clean.
    ops.cross_entropy(torch.randn(4, V, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV))


def test_cuda_graph_autograd_training_step():
    torch.manual_seed(0)
    model = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=True, device=DEV)
    eager = charmlp.MLPLanguageModel(27, 3, 10, 200, fused=True, device=DEV)
    eager.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    static_idx = torch.randint(0, 27, (32, 3), device=DEV)
    static_y = torch.randint(0, 27, (32,), device=DEV)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(static_idx, static_y, return_logits=False)[1]
        loss.backward()
        opt.step()
        return loss

    # Warm-up changes the parameters: re-sync the eager copy afterwards.
    _warmup(step)
    eager.load_state_dict(model.state_dict())
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static_idx, static_y, return_logits=False)[1]
        static_loss.backward()
        opt.step()

    for s in range(3):
        idx = torch.randint(0, 27, (32, 3), device=DEV)
        y = torch.randint(0, 27, (32,), device=DEV)
        static_idx.copy_(idx)
        static_y.copy_(y)
        graph.replay()
        opt_eager.zero_grad(set_to_none=True)
        ref = eager(idx, y, return_logits=False)[1]
        ref.backward()
        opt_eager.step()
        torch.cuda.synchronize()
        _close(static_loss, ref, torch.float32, f"loss {s}")
        for a, b in zip(model.parameters(), eager.parameters()):
            _close(a, b, torch.float32, f"param {s}")


# ----------------------------------------------------------------------------------------
# Deterministic mode
# ----------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.mark.parametrize(
    "shape,algorithm",
    [((4099, 3, 27, 10, 200), "direct"), ((2000, 3, 1000, 7, 33), "direct"), ((4099, 3, 27, 10, 200), "folded")],
    ids=["owned", "sorted", "folded"],
)
def test_deterministic_embed_backward_bitwise(deterministic, shape, algorithm):
    """direct: owned-entry reduction (small V*E) or ATen's sorted index_put_ (large);
    folded: always atomic-free."""
    _C._set_embed_algorithm(algorithm)
    try:
        _deterministic_embed_backward(shape)
    finally:
        _C._set_embed_algorithm("auto")


def _deterministic_embed_backward(shape):
    idx, table, weight, bias, grad_out = (t.to(DEV) for t in elt_inputs(*shape))
    table, weight, bias, grad_out = (t.float() for t in (table, weight, bias, grad_out))
    out = ops.embed_linear_tanh(idx, table, weight, bias)
    runs = [torch.ops.charmlp.embed_linear_tanh_backward(grad_out, out, idx, table, weight) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)
    # Same values as the (atomic) default mode, up to summation order.
    torch.use_deterministic_algorithms(False)
    atomic = torch.ops.charmlp.embed_linear_tanh_backward(grad_out, out, idx, table, weight)
    for a, b in zip(atomic, runs[0]):
        _close(a, b, torch.float32)


@pytest.mark.parametrize("B", [32, 1000, 4099], ids=["fused", "general-direct", "general-folded"])
def test_deterministic_training_bitwise(deterministic, B):
    V, T, E, H = 27, 3, 10, 200
    idx = torch.randint(0, V, (B, T), device=DEV)
    y = torch.randint(0, V, (B,), device=DEV)
    results = []
    for _ in range(2):
        params = _step_params(V, T, E, H, torch.float32)
        losses = [ops.mlp_sgd_step(idx, y, *params, 0.1) for _ in range(3)]
        x = torch.tanh(torch.randn(B, H, device=DEV, generator=torch.Generator(DEV).manual_seed(0)))
        xl = x.requires_grad_()
        w = params[3].detach().requires_grad_()
        lce = ops.linear_cross_entropy(xl, w, params[4], y)
        grads = torch.autograd.grad(lce, [xl, w])
        results.append((losses, params, lce, grads))
    (l0, p0, c0, g0), (l1, p1, c1, g1) = results
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert torch.equal(c0, c1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_deterministic_generic_linear_cross_entropy_bitwise(deterministic):
    """V > 32: the cuBLAS path (logits, grad_input, grad_weight), which needs the
    CUBLAS_WORKSPACE_CONFIG set at the top of this file under deterministic mode."""
    B, H, V = 4099, 64, 100
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.tanh(torch.randn(B, H, device=DEV, generator=g))
    w = torch.randn(V, H, device=DEV, generator=g) / 8
    b = torch.randn(V, device=DEV, generator=g)
    t = torch.randint(0, V, (B,), device=DEV, generator=g)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        loss = ops.linear_cross_entropy(*leaves, t, label_smoothing=0.1)
        runs.append((loss, *torch.autograd.grad(loss, leaves)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------
# Bad indices
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [27, -1, 10**9])
def test_bad_indices_raise(bad, embed_algorithm):
    V, T, E, H, B = 27, 3, 10, 20, 8
    table, w1, b1 = torch.randn(V, E, device=DEV), torch.randn(H, T * E, device=DEV), torch.randn(H, device=DEV)
    idx = torch.randint(0, V, (B, T), device=DEV)
    idx[2, 1] = bad
    with pytest.raises(IndexError, match=rf"charmlp: idx contains {bad} at flat position 7, outside the valid range \[0, 27\)"):
        ops.embed_linear_tanh(idx, table, w1, b1)
    good = torch.randint(0, V, (B, T), device=DEV)
    out = ops.embed_linear_tanh(good, table, w1, b1)  # the record was reset
    with pytest.raises(IndexError, match="idx contains"):
        torch.ops.charmlp.embed_linear_tanh_backward(torch.ones_like(out), out, idx, table, w1)

    logits = torch.randn(B, V, device=DEV)
    target = torch.randint(0, V, (B,), device=DEV)
    target[5] = bad if bad != -1 else -7
    val = bad if bad != -1 else -7
    with pytest.raises(IndexError, match=rf"charmlp: target contains {val} at flat position 5"):
        ops.cross_entropy(logits, target)
    _, lse = torch.ops.charmlp.cross_entropy(logits, torch.zeros_like(target), 1, -100, 0.0)
    with pytest.raises(IndexError, match="target contains"):
        torch.ops.charmlp.cross_entropy_backward(torch.ones((), device=DEV), logits, target, lse, 1, -100, 0.0)
    w2, b2 = torch.randn(V, H, device=DEV), torch.randn(V, device=DEV)
    h = torch.randn(B, H, device=DEV)
    with pytest.raises(IndexError, match="target contains"):
        ops.linear_cross_entropy(h, w2, b2, target)

    # The whole-model ops: exception, and no parameter changed.
    params = [table, w1, b1, w2, b2]
    before = [p.clone() for p in params]
    for op in (torch.ops.charmlp.mlp_cross_entropy, torch.ops.charmlp.mlp_cross_entropy_and_grads):
        with pytest.raises(IndexError, match="idx contains"):
            op(idx, torch.randint(0, V, (B,), device=DEV), *params)
        with pytest.raises(IndexError, match=rf"charmlp: target contains {val} at flat position 5"):
            op(good, target, *params)
    with pytest.raises(IndexError, match="idx contains"):
        ops.mlp_sgd_step(idx, torch.randint(0, V, (B,), device=DEV), *params, 0.1)
    with pytest.raises(IndexError, match="target contains"):
        ops.mlp_sgd_step(good, target, *params, 0.1)
    for a, b in zip(params, before):
        assert torch.equal(a, b)

    # The general step path (B > 128): the update kernel skips on the device.
    Bg = 300
    idx_g = torch.randint(0, V, (Bg, T), device=DEV)
    tgt_g = torch.randint(0, V, (Bg,), device=DEV)
    tgt_g[123] = val
    with pytest.raises(IndexError, match=rf"charmlp: target contains {val} at flat position 123"):
        ops.mlp_sgd_step(idx_g, tgt_g, *params, 0.1)
    idx_g[200, 2] = bad
    with pytest.raises(IndexError, match="idx contains"):
        ops.mlp_sgd_step(idx_g, torch.randint(0, V, (Bg,), device=DEV), *params, 0.1)
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    torch.cuda.synchronize()  # the context is healthy: no device-side assert fired


def test_async_index_check_mode_reports_on_a_later_call():
    """CHARMLP_CUDA_INDEX_CHECK=async: no sync per op; the error surfaces on a later op."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, charmlp
        from charmlp import ops
        x = torch.randn(4, 5, device="cuda")
        bad = torch.tensor([0, 1, 7, 2], device="cuda")
        good = torch.tensor([0, 1, 2, 3], device="cuda")
        try:
            ops.cross_entropy(x, bad)  # may or may not raise yet
        except IndexError as e:
            print("RAISED-AT-CALL", e); raise SystemExit(0)
        torch.cuda.synchronize()
        try:
            ops.cross_entropy(x, good)
        except IndexError as e:
            print("RAISED-LATER", e)
        else:
            raise SystemExit("no IndexError")
        # The fused step with a bad index: no update; the error surfaces later too.
        params = [torch.randn(s, device="cuda") for s in [(27, 10), (20, 30), (20,), (27, 20), (27,)]]
        before = [p.clone() for p in params]
        idx = torch.randint(0, 27, (8, 3), device="cuda")
        idx[1, 1] = 99
        y = torch.randint(0, 27, (8,), device="cuda")
        msg = None
        for _ in range(3):
            try:
                ops.mlp_sgd_step(idx, y, *params, 0.1)
                torch.cuda.synchronize()
            except IndexError as e:
                msg = str(e)
                break
        if msg is None or "idx contains 99 at flat position 4" not in msg:
            raise SystemExit(f"the bad step did not raise the expected IndexError: {msg}")
        if not all(torch.equal(p, q) for p, q in zip(params, before)):
            raise SystemExit("a step with a bad index changed the parameters")
        print("STEP-OK")
        """
    )
    env = dict(os.environ, CHARMLP_CUDA_INDEX_CHECK="async")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RAISED-LATER" in r.stdout and "target contains 7 at flat position 2" in r.stdout, r.stdout
    assert "STEP-OK" in r.stdout, r.stdout + r.stderr
