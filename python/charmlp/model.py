"""The MLP language model of Bengio et al. (2003), as in the makemore MLP lecture.

    idx [B, T] --embed_linear_tanh--> h [B, H] --linear--> logits [B, V] --cross-entropy--> loss

``fused=True`` runs the charmlp ops; ``fused=False`` runs the very same parameters
through plain PyTorch ops (:mod:`charmlp.reference`, the ground truth the kernels are
tested against), so the two paths can be compared and benchmarked on identical weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .modules import EmbedLinearTanh

__all__ = ["MLPLanguageModel", "NOTEBOOK_SEED"]

#: The generator seed of the lecture notebook's parameter draws.
NOTEBOOK_SEED = 2147483647

# The whole-model ops run every training step: skip the Python wrappers and cache
# which (device type, dtype) pairs have kernels.
_mlp_sgd_step = torch.ops.charmlp.mlp_sgd_step.default
_mlp_sgd_steps = torch.ops.charmlp.mlp_sgd_steps.default
_mlp_cross_entropy_and_grads = torch.ops.charmlp.mlp_cross_entropy_and_grads.default
_WHOLE_MODEL_KERNELS: dict = {}
# Largest output-layer weight (V * H) for which the CPU whole-model ops are the fast path
# (see MLPLanguageModel._whole_model_kernel_available): the lecture's is 5,400, the wide
# benchmark model's (H = 1,024) 27,648.
_WHOLE_MODEL_MAX_HEAD = 1 << 16


# A constant for torch.compile: the dispatcher query is not traceable, and its answer
# cannot change within a process.
@torch.compiler.assume_constant_result
def _whole_model_kernels(device_type: str, dtype: torch.dtype) -> bool:
    key = (device_type, dtype)
    if key not in _WHOLE_MODEL_KERNELS:
        # CPU: float32/float64; CUDA also takes bfloat16/float16 (float32 accumulation).
        dtype_ok = dtype in (torch.float32, torch.float64) or device_type == "cuda"
        _WHOLE_MODEL_KERNELS[key] = dtype_ok and all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"charmlp::{op}", device_type.upper())
            for op in ("mlp_cross_entropy", "mlp_logits_cross_entropy", "mlp_sgd_step", "mlp_sgd_steps")
        )
    return _WHOLE_MODEL_KERNELS[key]


def _laid_out_like(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with the strides ``AccumulateGrad`` gives a ``.grad``: the parameter's own
    when it is dense (``empty_like`` keeps exactly those), contiguous otherwise. Fused and
    foreach optimizers walk ``param``, ``.grad`` and their state as flat arrays in one order."""
    like = torch.empty_like(param)
    return like.copy_(grad) if like.stride() == param.stride() else grad.contiguous()


class MLPLanguageModel(nn.Module):
    """Character-level MLP language model.

    Args:
        vocab_size: V, number of tokens (27 for '.' plus a-z).
        block_size: T, context length in tokens.
        emb_dim: E, embedding width.
        hidden: H, hidden width.
        fused: run the charmlp kernels (True) or plain PyTorch ops (False).
        init: ``"default"`` (``nn.Embedding`` / ``nn.Linear`` initialization) or
            ``"notebook"``: the lecture's draws, ``torch.randn`` from one generator in
            the order C ``[V, E]``, W1 ``[T*E, H]``, b1 ``[H]``, W2 ``[H, V]``, b2 ``[V]``,
            then laid out for this API (``embed.weight = W1.T``, ``head.weight = W2.T``).
        generator: the generator for ``init="notebook"``; by default a fresh one seeded
            with the notebook's 2147483647, which reproduces the lecture's parameters.

    Parameters: ``embed.table`` ``[V, E]``, ``embed.weight`` ``[H, T*E]``, ``embed.bias``
    ``[H]``, ``head.weight`` ``[V, H]``, ``head.bias`` ``[V]``.
    """

    def __init__(
        self,
        vocab_size: int = 27,
        block_size: int = 3,
        emb_dim: int = 10,
        hidden: int = 200,
        fused: bool = True,
        init: str = "default",
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"MLPLanguageModel: vocab_size must be an int >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.emb_dim = emb_dim
        self.hidden = hidden
        self.fused = bool(fused)
        self.embed = EmbedLinearTanh(vocab_size, emb_dim, block_size, hidden, device=device, dtype=dtype)
        self.head = nn.Linear(hidden, vocab_size, device=device, dtype=dtype)
        if init == "notebook":
            self.notebook_init_(generator)
        elif init != "default":
            raise ValueError(f"MLPLanguageModel: init must be 'default' or 'notebook', got {init!r}")

    @torch.no_grad()
    def notebook_init_(self, generator: torch.Generator | None = None) -> "MLPLanguageModel":
        """Sets the parameters to the lecture notebook's draws (see the class docstring)."""
        g = generator if generator is not None else torch.Generator().manual_seed(NOTEBOOK_SEED)
        V, T, E, H = self.vocab_size, self.block_size, self.emb_dim, self.hidden
        C = torch.randn((V, E), generator=g)
        W1 = torch.randn((T * E, H), generator=g)
        b1 = torch.randn(H, generator=g)
        W2 = torch.randn((H, V), generator=g)
        b2 = torch.randn(V, generator=g)
        for param, value in (
            (self.embed.table, C),
            (self.embed.weight, W1.T),
            (self.embed.bias, b1),
            (self.head.weight, W2.T),
            (self.head.bias, b2),
        ):
            param.copy_(value)
        return self

    def config(self) -> dict:
        """The constructor arguments that define the architecture (for checkpoints)."""
        return {
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "emb_dim": self.emb_dim,
            "hidden": self.hidden,
            "fused": self.fused,
        }

    def _check_idx(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.shape[1] != self.block_size:
            raise ValueError(
                f"MLPLanguageModel: idx must have shape [B, block_size={self.block_size}], got {tuple(idx.shape)}"
            )

    def hidden_states(self, idx: Tensor) -> Tensor:
        """``h = tanh(concat(C[idx]) @ W1^T + b1)``, ``[B, H]``."""
        self._check_idx(idx)
        if self.fused:
            return self.embed(idx)
        return reference.embed_linear_tanh(idx, self.embed.table, self.embed.weight, self.embed.bias)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, return_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Returns ``(logits [B, V], loss)``; ``loss`` is the mean cross-entropy, None without targets.

        With targets, the fused path is the whole model as one op where it has a kernel
        (CPU float32/float64, CUDA): ``mlp_logits_cross_entropy``, whose forward writes the
        logits and the loss and, when a parameter requires grad, the five parameter
        gradients too, so ``loss.backward()`` only hands them over (and adds exactly what a
        gradient into the logits contributes, if the caller's graph sends one). This is the
        fast path for the usual loop, ``logits, loss = model(x, y); loss.backward();
        opt.step()``, with any optimizer. ``return_logits=False`` skips writing the
        ``[B, V]`` logits (returned as None): ``mlp_cross_entropy``, or
        ``embed_linear_tanh`` then ``linear_cross_entropy`` for other dtypes.
        """
        if targets is not None and self.fused:
            params = self._step_parameters()
            if self._whole_model_kernel_available(params[0]):
                self._check_idx(idx)
                if return_logits:
                    return ops.mlp_logits_cross_entropy(idx, targets, *params)
                return None, ops.mlp_cross_entropy(idx, targets, *params)
            # (other dtypes, or a word-level head: the layer ops)
            if not return_logits:
                h = self.hidden_states(idx)
                return None, ops.linear_cross_entropy(h, self.head.weight, self.head.bias, targets)
        h = self.hidden_states(idx)
        logits = F.linear(h, self.head.weight, self.head.bias)
        if targets is None:
            return logits, None
        if self.fused:
            return logits, ops.cross_entropy(logits, targets)
        return logits, reference.cross_entropy(logits, targets)

    def _step_parameters(self) -> tuple:
        """(table, W1, b1, W2, b2), read straight from the modules' parameter dicts.

        sgd_step runs every training step and its fused kernel takes ~40 us at B = 32;
        nn.Module.__getattr__ costs ~0.5 us a lookup, so the seven plain attribute reads
        this replaces were ~10% of the step.
        """
        embed, head = self._modules["embed"], self._modules["head"]
        e, h = embed._parameters, head._parameters
        return e["table"], e["weight"], e["bias"], h["weight"], h["bias"]

    def _whole_model_kernel_available(self, p: Tensor) -> bool:
        """Whether the whole-model ops (mlp_cross_entropy, mlp_sgd_step(s)) have a kernel for
        parameters like p (its device and dtype) and are the faster path for this model.

        On CPU their output layer is the fused chunk loop of small GEMMs, which wins for a
        character-level head and loses to BLAS for a word-level one (V = 16,383, H = 100:
        3x slower than plain PyTorch at B = 32): past ``_WHOLE_MODEL_MAX_HEAD`` weights the
        model runs its layer ops instead (``linear_cross_entropy`` switches to ATen's GEMMs).
        """
        if p.device.type == "cpu" and self.vocab_size * self.hidden > _WHOLE_MODEL_MAX_HEAD:
            return False
        return _whole_model_kernels(p.device.type, p.dtype)

    def forward_backward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Sets every parameter's ``.grad`` to the gradient of the mean cross-entropy and
        returns the loss (detached): ``zero_grad(set_to_none=True)``, forward, ``backward()``
        in one call, for any optimizer (``loss = model.forward_backward(x, y); opt.step()``).

        ``.grad`` is replaced, not accumulated. With ``fused=True`` and a whole-model kernel
        (CPU float32/float64, CUDA) this is the single ``mlp_cross_entropy_and_grads`` op with
        no autograd graph at all (about half the cost of autograd at the lecture's batch of
        32); otherwise autograd through the model.
        """
        params = self._step_parameters()
        if self.fused and self._whole_model_kernel_available(params[0]):
            self._check_idx(idx)
            with torch.no_grad():
                loss, *grads = _mlp_cross_entropy_and_grads(idx, targets, *params)
            for p, g in zip(params, grads):
                p.grad = g if g.stride() == p.stride() else _laid_out_like(g, p)
            return loss
        for p in params:
            p.grad = None
        with torch.enable_grad():
            _, loss = self(idx, targets, return_logits=False)
            loss.backward()
        return loss.detach()

    def sgd_step(self, idx: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One plain-SGD step on every parameter (``p -= lr * dloss/dp``); returns the loss.

        The loss is the mean cross-entropy before the update; ``.grad`` is left untouched.
        With ``fused=True`` (float32/float64) this is the single ``mlp_sgd_step`` kernel;
        otherwise autograd through the model's ops, then one foreach update.
        """
        params = self._step_parameters()
        if self.fused and self._whole_model_kernel_available(params[0]):
            self._check_idx(idx)
            # The op mutates the parameters in place: autograd must not record it. The raw
            # switch is what torch.no_grad() does, without the context manager's ~1.5 us.
            grad_was_enabled = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                return _mlp_sgd_step(idx, targets, *params, lr)
            finally:
                torch._C._set_grad_enabled(grad_was_enabled)
        params = list(params)
        with torch.enable_grad():
            _, loss = self(idx, targets, return_logits=False)
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)
        return loss.detach()

    def sgd_steps(self, idx: Tensor, targets: Tensor, lrs: Sequence[float]) -> Tensor:
        """``K`` plain-SGD steps: step ``k`` is ``sgd_step(idx[k], targets[k], lrs[k])``.

        idx ``[K, B, block_size]``, targets ``[K, B]``, one learning rate per step; returns the
        ``K`` losses (each before its update) as a ``[K]`` tensor. With ``fused=True`` and a
        whole-model kernel this is one ``mlp_sgd_steps`` call: the same kernels as ``K``
        ``sgd_step`` calls (bitwise the same result on CPU; see :func:`charmlp.ops.mlp_sgd_steps`)
        without their per-step Python round trip (the training loop's inner loop); otherwise
        it is that loop.
        """
        if idx.dim() != 3 or idx.shape[2] != self.block_size:
            raise ValueError(
                f"MLPLanguageModel: idx must have shape [K, B, block_size={self.block_size}], got {tuple(idx.shape)}"
            )
        lrs = [float(lr) for lr in lrs]
        if len(lrs) != idx.shape[0]:
            raise ValueError(f"MLPLanguageModel: lrs must hold one learning rate per step (K = {idx.shape[0]}), "
                             f"got {len(lrs)}")
        params = self._step_parameters()
        if self.fused and self._whole_model_kernel_available(params[0]):
            with torch.no_grad():
                return _mlp_sgd_steps(idx, targets, *params, lrs)
        losses = [self.sgd_step(idx[k], targets[k], lr) for k, lr in enumerate(lrs)]
        return torch.stack(losses) if losses else params[0].new_empty((0,))
