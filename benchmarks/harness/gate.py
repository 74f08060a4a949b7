"""The correctness gate: every arm against the float64 reference before it is timed.

The reference is ``charmlp.reference`` (the model written down once) evaluated in float64
on the arm's own float32 starting weights and batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from charmlp import reference as R

from .sizes import LR, PARAM_NAMES

# float32 tolerances, relative to each tensor's largest magnitude (gradient entries that
# are sums of many cancelling terms have no meaningful element-wise relative error). The
# float32 eager code itself is ~1e-4 off in the table gradient at the full batch (27 rows
# accumulating 684k contributions each); a wrong arm is off by O(1).
GATE_RTOL = {"loss": 1e-5, "grads": 1e-3}


def reference(params: dict[str, Tensor], idx: Tensor, y: Tensor, lr: float) -> dict:
    """Loss, gradients and SGD-updated parameters in float64 (``charmlp.reference``'s model)."""
    loss, grads = R.mlp_loss_and_grads(idx, y, [params[k] for k in PARAM_NAMES], dtype=torch.float64)
    grads = dict(zip(PARAM_NAMES, grads))
    updated = {k: (params[k].detach().double() - lr * grads[k]) for k in PARAM_NAMES}
    return {"loss": loss, "grads": grads, "updated": updated}


def rel_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max |ref| (inf for a wrong shape or a non-finite value)."""
    got = got.detach().to(ref.device, torch.float64)
    if got.shape != ref.shape:
        return math.inf
    if not torch.isfinite(got).all():
        return math.inf
    scale = max(ref.abs().max().item(), 1e-30)
    return (got - ref).abs().max().item() / scale


def gate_errors(loss: Tensor | None, grads: dict | None, updated: dict | None, step_loss: Tensor | None,
                ref: dict, start: dict | None = None, lr: float = LR) -> dict[str, float]:
    """Relative max errors of everything an arm produced against the float64 reference.

    ``grad.<p>``: the gradients after ``forward`` + ``backward``; ``step.loss``: the loss a
    training step returns; ``step.<p>``: the gradient a training step applied, recovered
    from the parameters before (``start``) and after (``updated``) as ``(start - updated) / lr``
    (which also catches a wrong learning rate or a parameter left out of the update).
    """
    errs: dict[str, float] = {}
    if loss is not None:
        errs["loss"] = rel_err(loss.reshape(()), ref["loss"])
    if grads is not None:
        for k in PARAM_NAMES:
            g = grads.get(k)
            errs[f"grad.{k}"] = math.inf if g is None else rel_err(g, ref["grads"][k])
    if step_loss is not None:
        errs["step.loss"] = rel_err(step_loss.reshape(()), ref["loss"])
    if updated is not None and start is not None:
        for k in PARAM_NAMES:
            applied = (start[k].double() - updated[k].to(start[k].device).double()) / lr
            errs[f"step.{k}"] = rel_err(applied, ref["grads"][k])
    return errs


def gate_passes(errs: dict[str, float]) -> tuple[bool, str]:
    bad = []
    for k, e in errs.items():
        kind = "loss" if k.endswith("loss") else "grads"
        if not e <= GATE_RTOL[kind]:
            bad.append(f"{k} rel.err {e:.2e} > {GATE_RTOL[kind]:.0e}")
    return (not bad), "; ".join(bad)


def check_arm(arm, params: dict[str, Tensor], idx: Tensor, y: Tensor, ref: dict, lr: float) -> dict[str, float]:
    """Runs the gate computations of one arm (forward + backward, then a training step, each
    from the starting weights) and returns its relative errors."""
    arm.load(params)
    loss = arm.fwd_bwd(idx, y).detach().clone()  # (clones: a CUDA-graph arm's outputs are static buffers)
    grads = {k: (v.clone() if v is not None else None) for k, v in arm.grads().items()}
    arm.load(params)
    arm.zero_grad()
    step_loss = arm.train_step(idx, y).detach().clone()
    updated = {k: v.clone() for k, v in arm.params().items()}
    arm.load(params)
    arm.zero_grad()
    return gate_errors(loss, grads, updated, step_loss, ref, start=params, lr=lr)
