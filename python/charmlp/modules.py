"""``nn.Module`` wrappers around the charmlp ops, drop-in for the layers they fuse."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["EmbedLinearTanh", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


def _init_like_linear(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Linear.reset_parameters``: Kaiming-uniform weight, bias U(-1/sqrt(fan_in), ...)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


class EmbedLinearTanh(nn.Module):
    """Embedding -> flatten -> linear -> tanh, fused: ``[B, T]`` ids -> ``[B, hidden]``.

    Equivalent to::

        h = torch.tanh(linear(embedding(idx).flatten(1)))

    with ``embedding = nn.Embedding(num_embeddings, embedding_dim)`` and
    ``linear = nn.Linear(context * embedding_dim, hidden, bias)``, but without
    materializing the ``[B, context * embedding_dim]`` embedding.

    Parameters: ``table`` ``[num_embeddings, embedding_dim]``, ``weight``
    ``[hidden, context * embedding_dim]``, ``bias`` ``[hidden]`` (or None). They are
    initialized as ``nn.Embedding`` (N(0, 1)) and ``nn.Linear`` (Kaiming-uniform) are.

    ``padding_idx`` is ``nn.Embedding``'s: that row of ``table`` starts at zero and gets
    no gradient (its value still enters the layer, as in ``nn.Embedding``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        context: int,
        hidden: int,
        bias: bool = True,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_embeddings", num_embeddings),
            ("embedding_dim", embedding_dim),
            ("context", context),
            ("hidden", hidden),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EmbedLinearTanh: {name} must be a positive int, got {value!r}")
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"EmbedLinearTanh: padding_idx must be an int in [-{num_embeddings}, {num_embeddings}), "
                    f"got {padding_idx!r}"
                )
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.context = context
        self.hidden = hidden
        self.table = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.weight = nn.Parameter(torch.empty(hidden, context * embedding_dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(hidden, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.table[self.padding_idx].fill_(0)
        _init_like_linear(self.weight, self.bias)

    @classmethod
    def from_modules(cls, embedding: nn.Embedding, linear: nn.Linear) -> "EmbedLinearTanh":
        """Builds the fused layer from an ``nn.Embedding`` and the ``nn.Linear`` after it.

        The parameters are copied, so the new layer computes exactly
        ``tanh(linear(embedding(idx).flatten(1)))`` and trains independently, with the
        same gradients: ``padding_idx`` is kept (that row gets no gradient). Options the
        fused kernel does not implement raise: ``max_norm`` (with its ``norm_type``),
        ``scale_grad_by_freq`` and ``sparse``.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_modules: embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_modules: linear must be an nn.Linear, got {type(linear).__name__}")
        for option, value, default in (
            ("max_norm", embedding.max_norm, None),
            ("scale_grad_by_freq", embedding.scale_grad_by_freq, False),
            ("sparse", embedding.sparse, False),
        ):
            if value != default:
                raise ValueError(
                    f"from_modules: nn.Embedding with {option}={value!r} is not supported "
                    f"(the fused layer would ignore it); use {option}={default!r} or the plain modules"
                )
        E = embedding.embedding_dim
        if linear.in_features % E != 0:
            raise ValueError(
                f"from_modules: linear.in_features ({linear.in_features}) must be a multiple of "
                f"embedding.embedding_dim ({E})"
            )
        table = embedding.weight
        if table.dtype != linear.weight.dtype or table.device != linear.weight.device:
            raise ValueError(
                f"from_modules: embedding ({table.dtype}, {table.device}) and linear "
                f"({linear.weight.dtype}, {linear.weight.device}) must share dtype and device"
            )
        layer = cls(
            embedding.num_embeddings,
            E,
            linear.in_features // E,
            linear.out_features,
            bias=linear.bias is not None,
            padding_idx=embedding.padding_idx,
            device=table.device,
            dtype=table.dtype,
        )
        with torch.no_grad():
            layer.table.copy_(table)
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, idx: Tensor) -> Tensor:
        table = self.table
        if self.padding_idx is not None:
            # The padding row detached: the same values, no gradient (nn.Embedding's rule).
            p = self.padding_idx
            table = torch.cat((table[:p], table[p : p + 1].detach(), table[p + 1 :]))
        return ops.embed_linear_tanh(idx, table, self.weight, self.bias)

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"context={self.context}, hidden={self.hidden}, bias={self.bias is not None}{padding}"
        )


def _class_weight_buffer(owner: str, name: str, weight: Tensor | None) -> Tensor | None:
    """Validated class weights for a loss module's buffer (moves with .to(), saved in state_dict)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{owner}: {name} must be a 1-D floating-point tensor of class weights or None, got "
            f"{type(weight).__name__}" + (" (pass reduction= by keyword)" if isinstance(weight, str) else "")
        )
    if weight.dim() != 1 or not weight.is_floating_point():
        raise ValueError(f"{owner}: {name} must be a 1-D floating-point tensor, got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    return weight


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` for ``[*, V]`` logits and class-index targets, fused.

    ``weight`` (class weights ``[V]``, a buffer as in ``nn.CrossEntropyLoss``), ``reduction``,
    ``ignore_index`` and ``label_smoothing`` mean what they mean there.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        ops.reduction_code(reduction)  # validate early
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.register_buffer("weight", _class_weight_buffer("CrossEntropyLoss", "weight", weight))
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(logits, target, self.reduction, self.ignore_index, self.label_smoothing,
                                 weight=self.weight)

    def extra_repr(self) -> str:
        weighted = ", weight=[...]" if self.weight is not None else ""
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}{weighted}")


class LinearCrossEntropyLoss(nn.Module):
    """An output layer and its loss, fused: ``F.cross_entropy(linear(input), target)``.

    Holds the ``nn.Linear(in_features, num_classes, bias)`` parameters (``weight``
    ``[num_classes, in_features]``, ``bias`` ``[num_classes]`` or None, initialized as
    ``nn.Linear``'s) and computes the loss with ``ops.linear_cross_entropy``: the
    ``[B, num_classes]`` logits are never stored, and for ``'mean'``/``'sum'`` the forward
    computes the gradients of input, weight and bias in the same pass. ``logits(input)``
    gives the logits when they are wanted (sampling, metrics). ``class_weight`` is
    ``nn.CrossEntropyLoss``'s ``weight`` (``[num_classes]``, a buffer), named apart from
    the projection's ``weight``. Input ``[*, in_features]`` takes targets ``[*]``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        device=None,
        dtype=None,
        *,
        class_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearCrossEntropyLoss: {name} must be a positive int, got {value!r}")
        ops.reduction_code(reduction)  # validate early
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"LinearCrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        class_weight = _class_weight_buffer("LinearCrossEntropyLoss", "class_weight", class_weight)
        if class_weight is not None and class_weight.shape[0] != num_classes:
            raise ValueError(f"LinearCrossEntropyLoss: class_weight must have shape [num_classes] = "
                             f"[{num_classes}], got {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_like_linear(self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **loss_options) -> "LinearCrossEntropyLoss":
        """The fused head with a copy of an ``nn.Linear``'s parameters (``loss_options``:
        reduction, ignore_index, label_smoothing, class_weight)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype, **loss_options)
        with torch.no_grad():
            head.weight.copy_(linear.weight)
            if linear.bias is not None:
                head.bias.copy_(linear.bias)
        return head

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.linear_cross_entropy(input, self.weight, self.bias, target, self.reduction,
                                        self.ignore_index, self.label_smoothing,
                                        class_weight=self.class_weight)

    def logits(self, input: Tensor) -> Tensor:
        return torch.nn.functional.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
            + (", class_weight=[...]" if self.class_weight is not None else "")
        )
