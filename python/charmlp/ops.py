"""Python entry points of the charmlp operators.

Each op has one public function here and, next to it, its ``register_fake``: the
shape/dtype inference that lets ``torch.compile`` (and meta tensors) trace through
the op without running it.

The kernels are in ``csrc/`` (schemas in ``csrc/ops.cpp``). Autograd is registered in
C++ (``csrc/autograd.cpp``): each differentiable op saves what its fused ``*_backward``
op needs and calls it once. A Python ``register_autograd`` would work the same way but
costs a Python round trip per op per step, which dominates at small batch sizes.
Shapes: B batch rows, T context, V vocabulary, E embedding width, H hidden width.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from . import _extension  # noqa: F401  (loads the library that defines torch.ops.charmlp)
from ._extension import _C

__all__ = [
    "embed_linear_tanh",
    "cross_entropy",
    "linear_cross_entropy",
    "mlp_cross_entropy",
    "mlp_logits_cross_entropy",
    "mlp_sgd_step",
    "mlp_sgd_steps",
    "op_names",
    "reduction_code",
]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def op_names() -> list[str]:
    """Every operator of the charmlp library (the schemas of csrc/ops.cpp), sorted."""
    return sorted(
        {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("charmlp::")}
    )


def reduction_code(reduction: str) -> int:
    """Maps 'none' / 'mean' / 'sum' to ATen's at::Reduction code."""
    try:
        return _REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"charmlp: reduction must be 'none', 'mean' or 'sum', got {reduction!r}"
        ) from None


def _check_same_device(reference: Tensor, reference_name: str, **tensors: Tensor | None) -> None:
    """Device check for the fake (meta) kernels, worded like the C++ one in csrc/checks.h."""
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise RuntimeError(
                f"charmlp: {name} is on {t.device} but {reference_name} is on {reference.device}; "
                "move them to the same device"
            )


def _check_scalar_loss_reduction(op: str, reduction: int) -> None:
    """The fake kernels' version of check_scalar_loss_reduction in csrc/checks.h."""
    torch._check(
        reduction in (1, 2),
        lambda: f"charmlp: {op} returns the gradients of a scalar loss: "
        f"reduction must be 1 (mean) or 2 (sum), got {reduction}",
    )


def _check_class_targets(op: str, target: Tensor) -> None:
    """Class-index targets only: F.cross_entropy's probability targets raise, never misread.
    (Other dtypes are the kernels' TypeError. Kept to one call: it is on every loss's path.)"""
    if target.is_floating_point():
        raise NotImplementedError(
            f"charmlp: {op} takes class-index targets (int64 or int32); probability targets "
            f"(target of dtype {target.dtype}) are not supported: use F.cross_entropy for them"
        )


def _flatten_leading(op: str, x: Tensor, target: Tensor, what: str) -> tuple[Tensor, Tensor, tuple | None]:
    """[*, C] inputs with [*] targets as [N, C] and [N] (class dimension last, as a sequence
    model's head produces it); returns the leading shape to restore, or None for 2-D input."""
    if x.dim() <= 2:
        return x, target, None
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"charmlp: {op}: target must have {what}'s leading shape {tuple(x.shape[:-1])} "
            f"({what} is [*, {x.shape[-1]}], class dimension last), got {tuple(target.shape)}"
        )
    return x.reshape(-1, x.shape[-1]), target.reshape(-1), tuple(target.shape)


def _eager(*tensors: Tensor | None) -> bool:
    """Whether a call may take the extension's eager entry point (csrc/module.cpp: the same
    dispatcher op, without torch.ops' 1.5-2 us of argument parsing) instead of torch.ops:
    not while torch.compile traces, and not when an argument or an active mode overrides
    __torch_function__ (torch.ops honours those)."""
    return not torch.compiler.is_compiling() and not has_torch_function(tensors)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in (and save lse in): float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# embed_linear_tanh
# --------------------------------------------------------------------------------------


def embed_linear_tanh(idx: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``tanh(F.linear(table[idx].reshape(B, T*E), weight, bias))`` as one fused op.

    Args:
        idx: int64 (or int32) ``[B, T]`` indices into ``table``, each in ``[0, V)``.
        table: ``[V, E]`` embedding table.
        weight: ``[H, T*E]`` first-layer weight (``nn.Linear`` layout).
        bias: ``[H]`` or None.

    Returns:
        ``[B, H]``. The ``[B, T*E]`` embedding is never materialized; the backward is one
        fused kernel returning the gradients of table (repeated indices accumulate),
        weight and bias. With ``create_graph=True`` the backward runs as ATen ops, so
        gradient penalties and double backward are exact; forward-mode AD raises.
    """
    if _eager(idx, table, weight, bias):
        return _C._eager_embed_linear_tanh(idx, table, weight, bias)
    return torch.ops.charmlp.embed_linear_tanh.default(idx, table, weight, bias)


@torch.library.register_fake("charmlp::embed_linear_tanh")
def _embed_linear_tanh_fake(idx, table, weight, bias):
    _check_same_device(table, "table", weight=weight, idx=idx, bias=bias)
    torch._check(idx.dim() == 2, lambda: f"charmlp: idx must be 2-D [B, T], got {tuple(idx.shape)}")
    torch._check(table.dim() == 2, lambda: f"charmlp: table must be 2-D [V, E], got {tuple(table.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == idx.shape[1] * table.shape[1],
        lambda: f"charmlp: weight must have shape [H, T*E], got {tuple(weight.shape)}",
    )
    return table.new_empty((idx.shape[0], weight.shape[0]))


@torch.library.register_fake("charmlp::embed_linear_tanh_backward")
def _embed_linear_tanh_backward_fake(grad_out, out, idx, table, weight):
    return table.new_empty(table.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# --------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    weight: Tensor | None = None,
) -> Tensor:
    """``F.cross_entropy(logits, target, ...)`` for ``[*, V]`` logits and class-index targets.

    Same semantics as PyTorch: reductions ``'none' | 'mean' | 'sum'``, rows whose target
    is ``ignore_index`` contribute nothing and are left out of the mean's denominator
    (an all-ignored batch gives nan under ``'mean'``), label smoothing, and class weights
    ``weight`` ``[V]`` (``'mean'`` then divides by the targets' total weight, and label
    smoothing weighs each class, both as PyTorch does; no gradient for ``weight``).
    ``[B, T, V]`` logits (class dimension last, as a sequence model's head gives them) take
    ``[B, T]`` targets; ``'none'`` returns that shape. Probability (floating) targets raise
    ``NotImplementedError``. The softmax
    is never stored: with ``'mean'`` or ``'sum'`` and a gradient to compute, the forward
    computes the gradient from the same exps as the loss and the backward only scales it;
    with ``'none'`` the forward saves the per-row log-sum-exp and the backward is one pass.
    A backward with ``create_graph=True`` is differentiable (double backward is exact);
    forward-mode AD raises ``NotImplementedError``.
    """
    _check_class_targets("cross_entropy", target)
    lead = None
    if logits.dim() > 2:
        logits, target, lead = _flatten_leading("cross_entropy", logits, target, "logits")
    args = (logits, target, reduction_code(reduction), int(ignore_index), float(label_smoothing), weight)
    if _eager(logits, target, weight):
        loss = _C._eager_cross_entropy(*args)
    else:
        loss, _lse = torch.ops.charmlp.cross_entropy.default(*args)
    return loss if lead is None or loss.dim() == 0 else loss.reshape(lead)


def _check_class_weight_fake(weight, V, ref, ref_name):
    if weight is None:
        return
    _check_same_device(ref, ref_name, weight=weight)
    torch._check(
        weight.dim() == 1 and weight.shape[0] == V,
        lambda: f"charmlp: weight (the class weights) must have shape [V] = [{V}], got {tuple(weight.shape)}",
    )


@torch.library.register_fake("charmlp::cross_entropy")
def _cross_entropy_fake(logits, target, reduction, ignore_index, label_smoothing, weight=None):
    _check_same_device(logits, "logits", target=target)
    torch._check(logits.dim() == 2, lambda: f"charmlp: logits must be 2-D [B, V], got {tuple(logits.shape)}")
    torch._check(
        target.dim() == 1 and target.shape[0] == logits.shape[0],
        lambda: f"charmlp: target must have shape [B], got {tuple(target.shape)}",
    )
    _check_class_weight_fake(weight, logits.shape[1], logits, "logits")
    B = logits.shape[0]
    loss = logits.new_empty((B,) if reduction == 0 else ())
    return loss, logits.new_empty((B,), dtype=_acc_dtype(logits.dtype))


@torch.library.register_fake("charmlp::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, logits, target, lse, reduction, ignore_index, label_smoothing,
                                 weight=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("charmlp::cross_entropy_and_grads")
def _cross_entropy_and_grads_fake(logits, target, reduction, ignore_index, label_smoothing, weight=None):
    _check_scalar_loss_reduction("cross_entropy_and_grads", reduction)
    loss, lse = _cross_entropy_fake(logits, target, reduction, ignore_index, label_smoothing, weight)
    return loss, lse, torch.empty_like(logits, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    class_weight: Tensor | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without storing logits.

    Args:
        input: ``[*, H]`` hidden states (``[B, H]``, or ``[B, T, H]`` from a sequence model:
            the leading dimensions are flattened, as ``F.linear`` treats them).
        weight: ``[V, H]`` output projection (``nn.Linear`` layout).
        bias: ``[V]`` or None.
        target: int64 (or int32) ``[*]`` class indices in ``[0, V)`` or ``ignore_index``,
            input's leading shape; ``reduction='none'`` returns a loss of that shape.
        reduction, ignore_index, label_smoothing: as ``F.cross_entropy``'s.
        class_weight: ``[V]`` class weights, ``F.cross_entropy``'s ``weight=`` (named apart
            from the projection ``weight``); no gradient flows to it. Probability (floating)
            targets raise ``NotImplementedError``.

    Logits are never stored. With ``'mean'`` or ``'sum'`` and a gradient to compute, the
    forward computes the gradients of input, weight and bias in the same pass (one GEMM
    fewer than a backward that recomputes the logits) and the backward only scales them.
    With ``'none'`` the forward keeps the per-row log-sum-exp and the backward recomputes
    each chunk of logits. A backward with ``create_graph=True`` is differentiable (double
    backward is exact); forward-mode AD raises ``NotImplementedError``.
    """
    _check_class_targets("linear_cross_entropy", target)
    lead = None
    if input.dim() > 2:
        input, target, lead = _flatten_leading("linear_cross_entropy", input, target, "input")
    args = (input, weight, bias, target, reduction_code(reduction), int(ignore_index), float(label_smoothing),
            class_weight)
    if _eager(input, weight, bias, target, class_weight):
        loss = _C._eager_linear_cross_entropy(*args)
    else:
        loss, _lse = torch.ops.charmlp.linear_cross_entropy.default(*args)
    return loss if lead is None or loss.dim() == 0 else loss.reshape(lead)


@torch.library.register_fake("charmlp::linear_cross_entropy")
def _linear_cross_entropy_fake(input, weight, bias, target, reduction, ignore_index, label_smoothing,
                               class_weight=None):
    _check_same_device(input, "input", weight=weight, bias=bias, target=target)
    torch._check(input.dim() == 2, lambda: f"charmlp: input must be 2-D [B, H], got {tuple(input.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == input.shape[1],
        lambda: f"charmlp: weight must have shape [V, H], got {tuple(weight.shape)}",
    )
    _check_class_weight_fake(class_weight, weight.shape[0], input, "input")
    B = input.shape[0]
    loss = input.new_empty((B,) if reduction == 0 else ())
    return loss, input.new_empty((B,), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("charmlp::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(
    grad_loss, input, weight, bias, target, lse, reduction, ignore_index, label_smoothing, class_weight=None
):
    return input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@torch.library.register_fake("charmlp::linear_cross_entropy_and_grads")
def _linear_cross_entropy_and_grads_fake(input, weight, bias, target, reduction, ignore_index, label_smoothing,
                                         class_weight=None):
    _check_scalar_loss_reduction("linear_cross_entropy_and_grads", reduction)
    loss, lse = _linear_cross_entropy_fake(input, weight, bias, target, reduction, ignore_index, label_smoothing,
                                           class_weight)
    return loss, lse, input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# --------------------------------------------------------------------------------------
# mlp_cross_entropy
# --------------------------------------------------------------------------------------


def mlp_cross_entropy(
    idx: Tensor,
    target: Tensor,
    table: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
) -> Tensor:
    """The whole model's mean cross-entropy as one differentiable op.

    ``F.cross_entropy(F.linear(tanh(F.linear(table[idx].flatten(1), weight1, bias1)),
    weight2, bias2), target)``, rows with target -100 ignored. Shapes: idx ``[B, T]``,
    target ``[B]``, table ``[V, E]``, weight1 ``[H, T*E]``, bias1 ``[H]``, weight2
    ``[V, H]``, bias2 ``[V]``; returns a scalar in the parameters' dtype.

    When a parameter requires grad, the forward computes the five parameter gradients
    in the same pass and saves them (they are smaller than the activations); the
    backward only scales them by the incoming gradient. So ``loss.backward()`` is
    nearly free, any optimizer can consume the ``.grad``s, and a double backward
    (``create_graph=True``) raises. Without grad (``torch.no_grad()``, evaluation) it
    computes the loss only. On CPU the batch runs once per distinct context.
    """
    args = (idx, target, table, weight1, bias1, weight2, bias2)
    if _eager(*args):
        return _C._eager_mlp_cross_entropy(*args)
    return torch.ops.charmlp.mlp_cross_entropy.default(*args)


def _check_mlp_fake(idx, target, table, weight1, bias1, weight2, bias2):
    _check_same_device(
        table, "table", idx=idx, target=target, weight1=weight1, bias1=bias1, weight2=weight2, bias2=bias2
    )
    torch._check(idx.dim() == 2, lambda: f"charmlp: idx must be 2-D [B, T], got {tuple(idx.shape)}")
    torch._check(
        target.dim() == 1 and target.shape[0] == idx.shape[0],
        lambda: f"charmlp: target must have shape [B], got {tuple(target.shape)}",
    )


@torch.library.register_fake("charmlp::mlp_cross_entropy")
def _mlp_cross_entropy_fake(idx, target, table, weight1, bias1, weight2, bias2):
    _check_mlp_fake(idx, target, table, weight1, bias1, weight2, bias2)
    return table.new_empty(())


@torch.library.register_fake("charmlp::mlp_cross_entropy_and_grads")
def _mlp_cross_entropy_and_grads_fake(idx, target, table, weight1, bias1, weight2, bias2):
    _check_mlp_fake(idx, target, table, weight1, bias1, weight2, bias2)
    return (table.new_empty(()),) + tuple(p.new_empty(p.shape) for p in (table, weight1, bias1, weight2, bias2))


# --------------------------------------------------------------------------------------
# mlp_logits_cross_entropy
# --------------------------------------------------------------------------------------


def mlp_logits_cross_entropy(
    idx: Tensor,
    target: Tensor,
    table: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
) -> tuple[Tensor, Tensor]:
    """The model's forward with targets as one differentiable op: ``(logits [B, V], loss)``.

    The same loss as :func:`mlp_cross_entropy`, plus the logits
    ``F.linear(tanh(F.linear(table[idx].flatten(1), weight1, bias1)), weight2, bias2)``
    (what ``logits, loss = model(x, y)`` returns). When a parameter requires grad the
    forward also computes the loss's five parameter gradients in the same pass, so
    ``loss.backward()`` only hands them over. A gradient that reaches the logits (another
    loss term on them) is added exactly by the backward, which then recomputes the hidden
    layer once. Double backward and forward-mode AD raise.
    """
    args = (idx, target, table, weight1, bias1, weight2, bias2)
    if _eager(*args):
        return _C._eager_mlp_logits_cross_entropy(*args)
    return torch.ops.charmlp.mlp_logits_cross_entropy.default(*args)


@torch.library.register_fake("charmlp::mlp_logits_cross_entropy")
def _mlp_logits_cross_entropy_fake(idx, target, table, weight1, bias1, weight2, bias2):
    _check_mlp_fake(idx, target, table, weight1, bias1, weight2, bias2)
    return table.new_empty((idx.shape[0], table.shape[0])), table.new_empty(())


@torch.library.register_fake("charmlp::mlp_logits_cross_entropy_and_grads")
def _mlp_logits_cross_entropy_and_grads_fake(idx, target, table, weight1, bias1, weight2, bias2):
    _check_mlp_fake(idx, target, table, weight1, bias1, weight2, bias2)
    return (table.new_empty((idx.shape[0], table.shape[0])), table.new_empty(())) + tuple(
        p.new_empty(p.shape) for p in (table, weight1, bias1, weight2, bias2)
    )


# --------------------------------------------------------------------------------------
# mlp_sgd_step
# --------------------------------------------------------------------------------------


def mlp_sgd_step(
    idx: Tensor,
    target: Tensor,
    table: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lr: float,
) -> Tensor:
    """One fused plain-SGD training step of the whole model; returns the pre-update loss.

    Computes the mean cross-entropy of ``linear(tanh(embed_linear(idx)))`` against
    ``target`` (rows with target -100 are ignored), its gradients, and updates the five
    parameters in place (``p -= lr * grad``), all in one op. Shapes: idx ``[B, T]``,
    target ``[B]``, table ``[V, E]``, weight1 ``[H, T*E]``, bias1 ``[H]``, weight2 ``[V, H]``,
    bias2 ``[V]``. Call it under ``torch.no_grad()`` when the parameters require grad.
    """
    return torch.ops.charmlp.mlp_sgd_step.default(idx, target, table, weight1, bias1, weight2, bias2, float(lr))


@torch.library.register_fake("charmlp::mlp_sgd_step")
def _mlp_sgd_step_fake(idx, target, table, weight1, bias1, weight2, bias2, lr):
    _check_same_device(table, "table", idx=idx, target=target, weight1=weight1, weight2=weight2)
    return table.new_empty(())


# --------------------------------------------------------------------------------------
# mlp_sgd_steps
# --------------------------------------------------------------------------------------


def _per_step_lrs(idx: Tensor, lr) -> list[float]:
    """One float per step (idx [K, B, T]) from one number (or 0-d tensor) or a sequence."""
    K = idx.shape[0] if idx.dim() == 3 else 0  # a wrong rank is reported by the op itself
    if isinstance(lr, numbers.Real) or (isinstance(lr, Tensor) and lr.dim() == 0):
        return [float(lr)] * K
    return [float(x) for x in lr]


def mlp_sgd_steps(
    idx: Tensor,
    target: Tensor,
    table: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lr: float | Sequence[float],
) -> Tensor:
    """``K`` fused plain-SGD steps in one call; returns the ``K`` pre-update losses.

    Step ``k`` is exactly ``mlp_sgd_step(idx[k], target[k], ..., lr[k])``: the same kernels
    whatever ``K``, so bitwise equal wherever the step itself is reproducible (always on
    CPU; on CUDA the fused small-batch step, or any step under
    ``torch.use_deterministic_algorithms(True)``). The steps run back to back in C++,
    without the Python and dispatcher round trip that a loop of ``mlp_sgd_step`` calls
    pays per step.
    Shapes: idx ``[K, B, T]``, target ``[K, B]``, parameters as in :func:`mlp_sgd_step`;
    ``lr`` is one number (or 0-d tensor) for every step or a sequence of ``K``; the result is
    ``[K]`` in the parameters' dtype. Every index of every step is checked before the
    first step runs: a bad one raises ``IndexError`` with no parameter changed. Call it
    under ``torch.no_grad()`` when the parameters require grad.
    """
    lrs = _per_step_lrs(idx, lr)
    return torch.ops.charmlp.mlp_sgd_steps.default(idx, target, table, weight1, bias1, weight2, bias2, lrs)


def _check_steps_fake(idx, target, lr):
    """mlp_sgd_steps' fake-kernel checks: idx [K, B, T], target [K, B], K learning rates."""
    torch._check(idx.dim() == 3, lambda: f"charmlp: idx must be 3-D [K, B, T], got {tuple(idx.shape)}")
    torch._check(
        target.dim() == 2 and target.shape == idx.shape[:2],
        lambda: f"charmlp: target must have shape [K, B], got {tuple(target.shape)}",
    )
    torch._check(
        len(lr) == idx.shape[0],
        lambda: f"charmlp: lr must hold one learning rate per step (K = {idx.shape[0]}), got {len(lr)}",
    )


@torch.library.register_fake("charmlp::mlp_sgd_steps")
def _mlp_sgd_steps_fake(idx, target, table, weight1, bias1, weight2, bias2, lr):
    _check_same_device(
        table, "table", idx=idx, target=target, weight1=weight1, bias1=bias1, weight2=weight2, bias2=bias2
    )
    _check_steps_fake(idx, target, lr)
    return table.new_empty((idx.shape[0],))
