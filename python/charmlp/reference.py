"""The MLP language model in plain PyTorch: the one ground truth for every charmlp kernel.

Every op test, every benchmark arm that stands for "plain PyTorch" and the model's
``fused=False`` path call these functions, so the model is written down once::

    idx [*, T] --C[idx]--> [*, T, E] --concat--> [*, T*E] --linear, tanh--> h [*, H]
               --linear--> logits [*, V] --cross-entropy--> loss

Parameters are in ``nn.Linear`` layout (``weight1`` is ``[H, T*E]``, ``weight2`` is
``[V, H]``), as charmlp's modules store them, except in :func:`notebook_loss` and
:func:`notebook_step`, the lecture notebook's raw-tensor forward and step with its
``W1 [T*E, H]`` / ``W2 [H, V]`` layout. :func:`module_loss` is the same model spelled as an
``nn.Module`` is written (:class:`MLP`'s forward: ``F.embedding``, ``flatten``, no reshapes):
what the benchmarks' plain-PyTorch arms time.
Nothing here is fast on purpose: it is what the kernels are measured against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The five parameters, in the order every charmlp op and these functions take them.
PARAM_NAMES = ("table", "weight1", "bias1", "weight2", "bias2")


def embed_linear_tanh(idx: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None = None,
                      padding_idx: int | None = None) -> Tensor:
    """``h = tanh(concat(table[idx]) @ weight^T + bias)``: ``idx [*, T]`` -> ``h [*, H]``.

    ``padding_idx`` is ``nn.Embedding``'s: that table row gets no gradient.
    """
    idx = idx.long()
    emb = table[idx] if padding_idx is None else F.embedding(idx, table, padding_idx)  # [*, T, E]
    # flatten, not reshape(..., -1): an empty batch has no size to infer.
    return torch.tanh(F.linear(emb.flatten(-2), weight, bias))


def cross_entropy(logits: Tensor, target: Tensor, **kwargs) -> Tensor:
    """``F.cross_entropy`` over the last dimension: ``logits [*, V]``, ``target [*]``.

    ``kwargs`` are ``F.cross_entropy``'s (``weight``, ``ignore_index``, ``reduction``,
    ``label_smoothing``); with ``reduction="none"`` the result has ``target``'s shape.
    """
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(), **kwargs)
    return loss.reshape(target.shape) if kwargs.get("reduction") == "none" else loss


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *,
                         class_weight: Tensor | None = None, **kwargs) -> Tensor:
    """``cross_entropy(h @ weight^T + bias, target)``, materializing the ``[*, V]`` logits.

    ``class_weight`` is ``F.cross_entropy``'s ``weight=`` (``weight`` is the layer's), as in
    ``charmlp.ops.linear_cross_entropy``.
    """
    return cross_entropy(F.linear(h, weight, bias), target, weight=class_weight, **kwargs)


def mlp_logits(idx: Tensor, table: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor,
               bias2: Tensor) -> Tensor:
    """The whole model's logits, ``[*, V]``."""
    return F.linear(embed_linear_tanh(idx, table, weight1, bias1), weight2, bias2)


def mlp_loss(idx: Tensor, target: Tensor, table: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor,
             bias2: Tensor, **kwargs) -> Tensor:
    """The whole model's cross-entropy (mean unless ``kwargs`` say otherwise)."""
    return cross_entropy(mlp_logits(idx, table, weight1, bias1, weight2, bias2), target, **kwargs)


def mlp_loss_and_grads(idx: Tensor, target: Tensor, params: Sequence[Tensor],
                       dtype: torch.dtype | None = None, **kwargs) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(loss, gradients of the five parameters)``, computed on detached copies.

    ``dtype`` (e.g. ``torch.float64``) computes in that precision instead of the
    parameters' own; the caller's tensors are never touched.
    """
    leaves = [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in params]
    loss = mlp_loss(idx, target, *leaves, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def mlp_sgd_step(idx: Tensor, target: Tensor, params: Sequence[Tensor], lr: float,
                 dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
    """One SGD step: ``(loss before the step, updated copies of the parameters)``."""
    loss, grads = mlp_loss_and_grads(idx, target, params, dtype=dtype)
    return loss, [(p.detach().to(g.dtype) - lr * g) for p, g in zip(params, grads)]


def notebook_loss(parameters: Sequence[Tensor], X: Tensor, Y: Tensor) -> Tensor:
    """The makemore MLP notebook's forward on its raw tensors: ``C[X]``, ``.view(-1, T*E) @ W1 + b1``,
    ``torch.tanh``, ``@ W2 + b2``, ``F.cross_entropy``. Layout as in :func:`notebook_step`."""
    C, W1, b1, W2, b2 = parameters
    emb = C[X]
    h = torch.tanh(emb.view(-1, W1.shape[0]) @ W1 + b1)
    logits = h @ W2 + b2
    return F.cross_entropy(logits, Y)


def notebook_step(parameters: Sequence[Tensor], X: Tensor, Y: Tensor, lr: float) -> Tensor:
    """The makemore MLP notebook's training step, on its raw tensors, in place.

    ``parameters = [C, W1, b1, W2, b2]`` in the notebook's layout (``W1 [T*E, H]``,
    ``W2 [H, V]``), each a leaf with ``requires_grad``. Returns the loss before the step.
    """
    loss = notebook_loss(parameters, X, Y)
    for p in parameters:
        p.grad = None
    loss.backward()
    for p in parameters:
        p.data += -lr * p.grad
    return loss


def module_hidden(idx: Tensor, table: Tensor, weight1: Tensor, bias1: Tensor) -> Tensor:
    """:func:`embed_linear_tanh` of an ``idx [B, T]`` batch as an ``nn.Module`` is written
    (:class:`MLP`'s first layer): ``tanh(F.linear(F.embedding(idx, table).flatten(1), weight1, bias1))``."""
    return torch.tanh(F.linear(F.embedding(idx, table).flatten(1), weight1, bias1))


def module_loss(idx: Tensor, target: Tensor, table: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor,
                bias2: Tensor) -> Tensor:
    """:func:`mlp_loss` of an ``idx [B, T]`` batch as an ``nn.Module`` is written (:class:`MLP`'s
    forward): :func:`module_hidden`, ``F.linear``, ``F.cross_entropy``, no reshapes."""
    h = module_hidden(idx, table, weight1, bias1)
    return F.cross_entropy(F.linear(h, weight2, bias2), target)


class MLP(torch.nn.Module):
    """The model as the ``nn.Module`` a PyTorch user writes: ``F.embedding``, ``F.linear``,
    ``torch.tanh``, ``F.cross_entropy``. ``forward(idx, target)`` returns the mean loss."""

    def __init__(self, table: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.detach().clone())
        self.weight1 = torch.nn.Parameter(weight1.detach().clone())
        self.bias1 = torch.nn.Parameter(bias1.detach().clone())
        self.weight2 = torch.nn.Parameter(weight2.detach().clone())
        self.bias2 = torch.nn.Parameter(bias2.detach().clone())

    def forward(self, idx: Tensor, target: Tensor) -> Tensor:
        return module_loss(idx, target, self.table, self.weight1, self.bias1, self.weight2, self.bias2)
