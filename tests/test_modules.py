"""The nn.Module wrappers and the full model: fused vs plain PyTorch on identical weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import charmlp
from charmlp import CrossEntropyLoss, EmbedLinearTanh, MLPLanguageModel, reference
from conftest import assert_close


def test_embed_linear_tanh_from_modules_is_identical():
    torch.manual_seed(0)
    emb, lin = nn.Embedding(27, 10), nn.Linear(30, 200)
    fused = EmbedLinearTanh.from_modules(emb, lin)
    idx = torch.randint(0, 27, (64, 3))
    ref = reference.embed_linear_tanh(idx, emb.weight, lin.weight, lin.bias)
    out = fused(idx)
    assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert_close(fused.table.grad, emb.weight.grad)
    assert_close(fused.weight.grad, lin.weight.grad)
    assert_close(fused.bias.grad, lin.bias.grad)
    # Copies, not aliases: training one does not move the other.
    assert fused.table.data_ptr() != emb.weight.data_ptr()


def test_from_modules_without_bias_and_bad_pairs():
    emb, lin = nn.Embedding(5, 4), nn.Linear(8, 3, bias=False)
    layer = EmbedLinearTanh.from_modules(emb, lin)
    assert layer.bias is None and layer.context == 2
    with pytest.raises(ValueError, match="multiple of"):
        EmbedLinearTanh.from_modules(nn.Embedding(5, 4), nn.Linear(9, 3))
    with pytest.raises(TypeError, match="nn.Embedding"):
        EmbedLinearTanh.from_modules(nn.Linear(5, 4), lin)
    with pytest.raises(ValueError, match="max_norm"):
        EmbedLinearTanh.from_modules(nn.Embedding(5, 4, max_norm=1.0), lin)


def test_embed_linear_tanh_module_init_and_validation():
    layer = EmbedLinearTanh(27, 10, 3, 200)
    assert layer.table.shape == (27, 10) and layer.weight.shape == (200, 30) and layer.bias.shape == (200,)
    assert "context=3" in repr(layer)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        EmbedLinearTanh(27, 10, 3, 0)


def test_cross_entropy_loss_module():
    logits, target = torch.randn(20, 27, requires_grad=True), torch.randint(0, 27, (20,))
    target[3] = 5
    crit = CrossEntropyLoss(reduction="sum", ignore_index=5, label_smoothing=0.1)
    ref = reference.cross_entropy(logits, target, reduction="sum", ignore_index=5, label_smoothing=0.1)
    assert_close(crit(logits, target), ref)
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize("config", [dict(), dict(vocab_size=30, block_size=5, emb_dim=7, hidden=33)])
@pytest.mark.parametrize("batch", [1, 32, 1000])
def test_fused_and_reference_paths_agree(config, batch):
    model = MLPLanguageModel(**config, init="notebook")
    V, T = model.vocab_size, model.block_size
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, V, (batch, T), generator=g)
    targets = torch.randint(0, V, (batch,), generator=g)
    results = {}
    for fused in (True, False):
        model.fused = fused
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, targets)
        loss.backward()
        results[fused] = (logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()])
    (l1, loss1, g1), (l0, loss0, g0) = results[True], results[False]
    assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    assert_close(loss1, loss0)
    for a, b in zip(g1, g0):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_notebook_init_reproduces_the_lecture_draws():
    model = MLPLanguageModel(init="notebook")
    g = torch.Generator().manual_seed(2147483647)
    C = torch.randn((27, 10), generator=g)
    W1 = torch.randn((30, 200), generator=g)
    b1 = torch.randn(200, generator=g)
    W2 = torch.randn((200, 27), generator=g)
    b2 = torch.randn(27, generator=g)
    torch.testing.assert_close(model.embed.table, C, rtol=0, atol=0)
    torch.testing.assert_close(model.embed.weight, W1.T, rtol=0, atol=0)
    torch.testing.assert_close(model.embed.bias, b1, rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight, W2.T, rtol=0, atol=0)
    torch.testing.assert_close(model.head.bias, b2, rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == 11897  # the lecture's parameter count


def test_model_without_targets_and_bad_shapes():
    model = MLPLanguageModel()
    logits, loss = model(torch.zeros(4, 3, dtype=torch.long))
    assert logits.shape == (4, 27) and loss is None
    with pytest.raises(ValueError, match="block_size=3"):
        model(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="init must be"):
        MLPLanguageModel(init="xavier")


@pytest.mark.parametrize("batch", [1, 32, 5000])
def test_sgd_step_matches_manual_sgd(batch):
    torch.manual_seed(batch)
    fused = MLPLanguageModel(init="notebook")
    ref = MLPLanguageModel(init="notebook", fused=False)
    idx = torch.randint(0, 27, (batch, 3))
    targets = torch.randint(0, 27, (batch,))
    for step in range(3):
        loss = fused.sgd_step(idx, targets, lr=0.1)
        ref.zero_grad(set_to_none=True)
        _, ref_loss = ref(idx, targets)
        ref_loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
        assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.parameters(), ref.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert a.grad is None


def test_sgd_step_restores_grad_mode_and_sees_replaced_parameters():
    model = MLPLanguageModel(init="notebook")
    idx = torch.randint(0, 27, (16, 3))
    targets = torch.randint(0, 27, (16,))
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            model.sgd_step(idx, targets, lr=0.1)
            assert torch.is_grad_enabled() is enabled
            # An error inside the op (bad index) must not leave grad mode switched off.
            with pytest.raises(IndexError, match="idx"):
                model.sgd_step(torch.full((16, 3), 27), targets, lr=0.1)
            assert torch.is_grad_enabled() is enabled
    # The step reads the parameters on every call: a replaced one is the one updated.
    new_w2 = nn.Parameter(torch.zeros(27, 200))
    model.head.weight = new_w2
    model.sgd_step(idx, targets, lr=0.1)
    assert new_w2.abs().sum() > 0
    assert model.head.weight is new_w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32-fused-op", "bf16-autograd"])
@pytest.mark.parametrize("batch", [1, 32, 5000])
def test_forward_backward_sets_the_gradients(batch, dtype):
    torch.manual_seed(batch)
    model = MLPLanguageModel(init="notebook").to(dtype)
    ref = MLPLanguageModel(init="notebook", fused=False).to(torch.float64)
    idx = torch.randint(0, 27, (batch, 3))
    targets = torch.randint(0, 27, (batch,))
    targets[1::4] = -100
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # replaced, not accumulated
    with torch.no_grad():  # works under no_grad too (it needs no graph)
        loss = model.forward_backward(idx, targets)
    _, ref_loss = ref(idx, targets)
    ref_loss.backward()
    assert loss.dtype == dtype and not loss.requires_grad
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert_close(loss, ref_loss.detach().to(dtype), **tol)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert a.grad.dtype == dtype
        if dtype == torch.bfloat16:  # tanh' from a rounded h: error relative to the largest entry
            tol = dict(rtol=0, atol=3e-2 * b.grad.abs().max().item())
        assert_close(a.grad.double(), b.grad, **tol)
    with pytest.raises(IndexError, match="idx contains 27"):
        model.forward_backward(torch.full((batch, 3), 27), targets)
    with pytest.raises(ValueError, match="block_size=3"):
        model.forward_backward(torch.zeros(batch, 2, dtype=torch.long), targets)


def test_compiled_model_fullgraph():
    model = MLPLanguageModel(init="notebook")
    idx = torch.randint(0, 27, (256, 3))
    targets = torch.randint(0, 27, (256,))
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(idx, targets)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref_logits, ref_loss = model(idx, targets)
    ref_loss.backward()
    assert_close(logits, ref_logits)
    assert_close(loss, ref_loss)
    for a, p in zip(got, model.parameters()):
        assert_close(a, p.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss_module_matches_linear_and_cross_entropy(bias, reduction):
    torch.manual_seed(0)
    linear = nn.Linear(40, 27, bias=bias)
    head = charmlp.LinearCrossEntropyLoss.from_linear(linear, reduction=reduction, label_smoothing=0.1)
    h = torch.randn(64, 40, requires_grad=True)
    target = torch.randint(0, 27, (64,))
    target[::5] = -100
    loss = head(h, target)
    ref = reference.linear_cross_entropy(h, linear.weight, linear.bias, target, reduction=reduction,
                                         label_smoothing=0.1)
    assert_close(loss, ref)
    params = [h] + list(head.parameters())
    ref_params = [h] + list(linear.parameters())
    w = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    for got, want in zip(torch.autograd.grad(loss, params, w), torch.autograd.grad(ref, ref_params, w)):
        assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_close(head.logits(h), linear(h))
    assert "num_classes=27" in repr(head)


def test_linear_cross_entropy_loss_module_checks_its_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        charmlp.LinearCrossEntropyLoss(8, 0)
    with pytest.raises(ValueError, match="reduction must be"):
        charmlp.LinearCrossEntropyLoss(8, 3, reduction="avg")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        charmlp.LinearCrossEntropyLoss.from_linear(nn.Embedding(3, 4))
