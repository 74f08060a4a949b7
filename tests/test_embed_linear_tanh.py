"""charmlp.ops.embed_linear_tanh against the plain PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from charmlp import ops, reference
from conftest import assert_close

# Every test runs against the fast kernels and the naive ones (charmlp.set_kernel_impl).
pytestmark = pytest.mark.usefixtures("kernel_impl")

# (B, T, V, E, H): the lecture size, sizes down to 1, odd sizes, and large batches.
SHAPES = [
    (32, 3, 27, 10, 200),
    (1, 1, 2, 1, 1),
    (7, 1, 2, 1, 3),
    (5, 2, 3, 1, 1),
    (13, 5, 11, 3, 17),
    (64, 8, 27, 64, 33),
    (300, 4, 1000, 7, 65),   # V much larger than B: the direct algorithm's territory
    (4099, 3, 27, 10, 200),
    (1, 16, 5, 2, 129),
]


def _inputs(B, T, V, E, H, dtype=torch.float32, bias=True, idx_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g).to(idx_dtype)
    table = torch.randn(V, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(H, T * E, generator=g, dtype=torch.float64) / (T * E) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(H, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    return idx, table, weight, b


def _grads(fn, idx, table, weight, bias, grad_out):
    params = [p for p in (table, weight, bias) if p is not None]
    out = fn(idx, table, weight, bias)
    grads = torch.autograd.grad(out, params, grad_out)
    return out, grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, bias, embed_algorithm):
    idx, table, weight, b = _inputs(*shape, bias=bias)
    grad_out = torch.randn(shape[0], shape[4])
    out, grads = _grads(ops.embed_linear_tanh, idx, table, weight, b, grad_out)
    ref, ref_grads = _grads(reference.embed_linear_tanh, idx, table, weight, b, grad_out)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype, embed_algorithm):
    idx, table, weight, b = _inputs(100, 3, 27, 10, 50, dtype=dtype)
    grad_out = torch.randn(100, 50, dtype=torch.float64).to(dtype)
    out, grads = _grads(ops.embed_linear_tanh, idx, table, weight, b, grad_out)
    # Reference in float64 from the same (rounded) inputs, cast at the end.
    up = [t.detach().double().requires_grad_() for t in (table, weight, b)]
    ref, ref_grads = _grads(reference.embed_linear_tanh, idx, *up, grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, ref.to(dtype), dtype=dtype)
    for got, want in zip(grads, ref_grads):
        tol = dict(rtol=5e-2, atol=1e-1) if dtype == torch.bfloat16 else {}
        assert_close(got, want.to(dtype), dtype=dtype, **tol)


def test_int32_indices_match_int64():
    idx, table, weight, b = _inputs(40, 3, 27, 10, 20)
    out64 = ops.embed_linear_tanh(idx, table, weight, b)
    out32 = ops.embed_linear_tanh(idx.int(), table, weight, b)
    torch.testing.assert_close(out32, out64, rtol=0, atol=0)


def test_repeated_indices_accumulate(embed_algorithm):
    # Every row points at row 3 of the table: its gradient is the sum over all rows and positions.
    idx = torch.full((50, 4), 3)
    _, table, weight, b = _inputs(50, 4, 9, 5, 12)
    grad_out = torch.randn(50, 12)
    _, grads = _grads(ops.embed_linear_tanh, idx, table, weight, b, grad_out)
    _, ref_grads = _grads(reference.embed_linear_tanh, idx, table, weight, b, grad_out)
    assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-4)
    assert grads[0][torch.arange(9) != 3].abs().max() == 0


def test_gradcheck_float64(embed_algorithm):
    idx, table, weight, b = _inputs(6, 3, 5, 2, 4, dtype=torch.float64)
    idx[0] = idx[1]  # repeated rows
    assert torch.autograd.gradcheck(ops.embed_linear_tanh, (idx, table, weight, b))
    assert torch.autograd.gradcheck(lambda t, w: ops.embed_linear_tanh(idx, t, w, None), (table, weight))


@pytest.mark.parametrize("shape", [(8, 3, 27, 10, 20), (0, 2, 5, 3, 4), (3, 1, 2, 1, 1)], ids=str)
def test_opcheck(shape):
    idx, table, weight, b = _inputs(*shape)
    torch.library.opcheck(torch.ops.charmlp.embed_linear_tanh.default, (idx, table, weight, b))
    torch.library.opcheck(torch.ops.charmlp.embed_linear_tanh.default, (idx, table, weight, None))
    out = torch.tanh(torch.randn(shape[0], shape[4]))
    torch.library.opcheck(
        torch.ops.charmlp.embed_linear_tanh_backward.default,
        (torch.randn_like(out), out, idx, table.detach(), weight.detach()),
    )


def test_torch_compile_fullgraph():
    idx, table, weight, b = _inputs(64, 3, 27, 10, 30)

    def f(idx, table, weight, b):
        return (ops.embed_linear_tanh(idx, table, weight, b) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(idx, table, weight, b)
    grads = torch.autograd.grad(got, (table, weight, b))
    want = f(idx, table, weight, b)
    ref_grads = torch.autograd.grad(want, (table, weight, b))
    assert_close(got, want)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def test_empty_batch(embed_algorithm):
    idx, table, weight, b = _inputs(0, 3, 27, 10, 20)
    out = ops.embed_linear_tanh(idx, table, weight, b)
    assert out.shape == (0, 20)
    out.sum().backward()
    assert table.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


def test_non_contiguous_and_offset_views(embed_algorithm):
    g = torch.Generator().manual_seed(1)
    big_idx = torch.randint(0, 27, (40, 6), generator=g)
    idx = big_idx[5:35:2, ::2]                 # strided, offset view [15, 3]
    base = torch.randn(30, 12, generator=g)
    table_view = base[2:29, 1:11]              # offset, non-contiguous rows [27, 10]
    weight_view = torch.randn(30, 20, generator=g).T  # transposed [20, 30]
    bias_view = torch.randn(40, generator=g)[::2]     # strided [20]
    out = ops.embed_linear_tanh(idx, table_view, weight_view, bias_view)
    ref = reference.embed_linear_tanh(idx, table_view, weight_view, bias_view)
    assert_close(out, ref)
    assert not idx.is_contiguous() and not table_view.is_contiguous() and not weight_view.is_contiguous()


@pytest.mark.parametrize("bad", [-1, 27, 10**6, -(10**9)])
def test_out_of_range_index_raises(bad, embed_algorithm):
    idx, table, weight, b = _inputs(20, 3, 27, 10, 8)
    idx[7, 2] = bad
    with pytest.raises(IndexError, match=rf"idx contains {bad} .*\[0, 27\)"):
        ops.embed_linear_tanh(idx, table, weight, b)
    out = torch.tanh(torch.randn(20, 8))
    with pytest.raises(IndexError, match="idx"):
        torch.ops.charmlp.embed_linear_tanh_backward(out, out, idx, table.detach(), weight.detach())


def test_bad_arguments_name_the_argument():
    idx, table, weight, b = _inputs(4, 3, 27, 10, 8)
    cases = [
        ((idx.float(), table, weight, b), TypeError, "idx must be an int64 or int32"),
        ((idx[0], table, weight, b), ValueError, r"idx must be 2-D"),
        ((idx, table[0], weight, b), ValueError, r"table must be 2-D"),
        ((idx, table, weight[:, :-1], b), ValueError, r"weight must have shape \[H, T\*E\] = \[H, 30\]"),
        ((idx, table, weight, b[:-1]), ValueError, r"bias must have shape \[H\] = \[8\]"),
        ((idx, table, weight.double(), b), TypeError, "weight has dtype Double but table has dtype Float"),
        ((idx, table, weight, b.double()), TypeError, "bias has dtype Double"),
        ((idx, table.long(), weight, b), TypeError, "table must be a floating-point tensor"),
        ((idx, table.to("meta"), weight, b), RuntimeError, "weight is on cpu but table is on meta"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.embed_linear_tanh(*args)


def test_deterministic_run_to_run(embed_algorithm):
    idx, table, weight, b = _inputs(2000, 3, 27, 10, 200)
    grad_out = torch.randn(2000, 200)
    first = _grads(ops.embed_linear_tanh, idx, table, weight, b, grad_out)
    for _ in range(3):
        again = _grads(ops.embed_linear_tanh, idx, table, weight, b, grad_out)
        torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
        for g, f in zip(again[1], first[1]):
            torch.testing.assert_close(g, f, rtol=0, atol=0)
