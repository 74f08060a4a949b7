"""Cases that once gave a silently wrong number (issue 13), each pinned by a test.

Higher-order and forward-mode autograd are in test_higher_order.py; the run-directory
and CLI cases in test_run_dir.py and test_cli.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import charmlp
from charmlp import EmbedLinearTanh, ops, reference

V, T, E, H = 27, 3, 10, 20


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(V, E), (H, T * E), (H,), (V, H), (V,)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


# ---- context grouping counts rows exactly past float32's 2^24 ------------------------


def _one_context_repeated(n):
    """n rows of a single context (the grouped path: one distinct context), targets 5 and 7
    alternating; expand() keeps the inputs cheap to build."""
    idx = torch.tensor([[1, 2, 3]]).expand(n, T)
    target = torch.tensor([5, 7]).repeat(n // 2)
    return idx, target


def test_grouped_loss_and_gradients_count_rows_past_2_pow_24():
    n = 2**25
    idx, target = _one_context_repeated(n)
    params = _params()
    # The exact answer: the rows are two distinct (context, target) pairs, half each.
    ref = [p.double().requires_grad_() for p in params]
    ref_loss = ops.mlp_cross_entropy(idx[:2], target[:2], *ref)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    loss, *grads = torch.ops.charmlp.mlp_cross_entropy_and_grads(idx, target, *params)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ops.mlp_cross_entropy(idx, target, *params).double(), ref_loss.detach(),
                                   rtol=1e-5, atol=1e-6)
    stepped = [p.clone() for p in params]
    step_loss = ops.mlp_sgd_step(idx, target, *stepped, 0.1)
    torch.testing.assert_close(step_loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for p, s, r in zip(params, stepped, ref_grads):
        torch.testing.assert_close(s.double(), p.double() - 0.1 * r, rtol=1e-4, atol=1e-5)


# ---- gradients handed to .grad have the parameter's strides --------------------------


def _model_with_layout(layout):
    m = charmlp.MLPLanguageModel(vocab_size=V, block_size=T, emb_dim=E, hidden=H, init="notebook")
    if layout == "transposed":  # the notebook's W1 [T*E, H], W2 [H, V] used as .T
        m.embed.weight = nn.Parameter(m.embed.weight.detach().T.contiguous().T)
        m.head.weight = nn.Parameter(m.head.weight.detach().T.contiguous().T)
    elif layout == "strided":  # every other column of a wider tensor (not dense)
        wide = torch.zeros(H, 2 * T * E)
        wide[:, ::2] = m.embed.weight.detach()
        m.embed.weight = nn.Parameter(wide[:, ::2])
    return m


OPTIMIZERS = {
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
}


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_forward_backward_grads_have_the_parameters_strides(layout, optimizer):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, V, (64, T), generator=g), torch.randint(0, V, (64,), generator=g))
               for _ in range(4)]
    fast, ref = _model_with_layout(layout), _model_with_layout(layout)
    ref.fused = False
    opt_fast, opt_ref = OPTIMIZERS[optimizer](list(fast.parameters())), OPTIMIZERS[optimizer](list(ref.parameters()))
    for x, y in batches:
        fast.forward_backward(x, y)
        for p in fast.parameters():
            assert p.grad.stride() == p.stride() or not _dense(p)
        opt_fast.step()
        opt_ref.zero_grad()
        ref(x, y)[1].backward()  # AccumulateGrad lays .grad out like the parameter
        opt_ref.step()
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _dense(t):
    return torch.empty_like(t).stride() == t.stride()


# ---- from_modules honours or rejects every nn.Embedding option ------------------------


@pytest.mark.parametrize("padding_idx", [0, 4, -1])
def test_from_modules_keeps_padding_idx(padding_idx):
    torch.manual_seed(0)
    emb, lin = nn.Embedding(6, 3, padding_idx=padding_idx), nn.Linear(2 * 3, 5)
    fused = EmbedLinearTanh.from_modules(emb, lin)
    idx = torch.tensor([[0, 4], [5, 0], [4, 4], [1, 2]])
    ref = reference.embed_linear_tanh(idx, emb.weight, lin.weight, lin.bias, padding_idx=emb.padding_idx)
    ref.pow(2).sum().backward()
    fused(idx).pow(2).sum().backward()
    row = padding_idx % 6
    assert emb.weight.grad[row].abs().sum() == 0
    for a, b in ((fused.table.grad, emb.weight.grad), (fused.weight.grad, lin.weight.grad),
                 (fused.bias.grad, lin.bias.grad)):
        torch.testing.assert_close(a, b)


def test_padding_idx_row_starts_at_zero_and_is_validated():
    layer = EmbedLinearTanh(7, 2, 3, 4, padding_idx=2)
    assert layer.table[2].abs().sum() == 0 and layer.table.abs().sum() > 0
    assert "padding_idx=2" in repr(layer)
    for bad in (7, -8, 1.5):
        with pytest.raises(ValueError, match="padding_idx"):
            EmbedLinearTanh(7, 2, 3, 4, padding_idx=bad)


@pytest.mark.parametrize("option", [dict(scale_grad_by_freq=True), dict(max_norm=1.0),
                                    dict(max_norm=1.0, norm_type=1.0), dict(sparse=True)])
def test_from_modules_rejects_options_it_would_ignore(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        EmbedLinearTanh.from_modules(nn.Embedding(5, 4, **option), nn.Linear(8, 3))


# ---- the training-step ops refuse to mutate parameters autograd is tracking ----------


def test_sgd_step_ops_refuse_parameters_that_require_grad_in_grad_mode():
    idx, target = torch.randint(0, V, (8, T)), torch.randint(0, V, (8,))
    params = [p.requires_grad_() for p in _params()]
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="mlp_sgd_step updates table in place.*torch.no_grad"):
        ops.mlp_sgd_step(idx, target, *params, 0.1)
    with pytest.raises(RuntimeError, match="mlp_sgd_steps updates table in place"):
        ops.mlp_sgd_steps(idx[None], target[None], *params, [0.1])
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    # Only table requires grad: the message names it; under no_grad every op runs.
    frozen = [p.detach().clone() for p in params]
    frozen[3].requires_grad_()
    with pytest.raises(RuntimeError, match="updates weight2 in place"):
        ops.mlp_sgd_step(idx, target, *frozen, 0.1)
    with torch.no_grad():
        ops.mlp_sgd_step(idx, target, *params, 0.1)


def test_sgd_step_bumps_versions_so_a_stale_graph_raises():
    idx, target = torch.randint(0, V, (8, T)), torch.randint(0, V, (8,))
    params = [p.requires_grad_() for p in _params()]
    loss = reference.mlp_loss(idx, target, *params)
    with torch.no_grad():
        ops.mlp_sgd_step(idx, target, *params, 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
