"""The arms of each layer (PyTorch's code and charmlp's op) and their correctness gate against
``charmlp.reference`` in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charmlp import ops
from charmlp import reference as R
from harness import GATE_RTOL as SUITE_RTOL
from harness import rel_err

from .cases import Case


def _flat(h, y):
    """torch's arms on a [B, T, H] input: the flattened rows, as users call F.cross_entropy."""
    return (h.reshape(-1, h.shape[-1]), y.reshape(-1)) if h.dim() > 2 else (h, y)


# The PyTorch arms. embed_linear_tanh's is the model's first layer as an nn.Module is written,
# from charmlp.reference; the loss arms are torch's own functions, called as users call them
# (charmlp.reference's shape-generic reshapes are not their work).
torch_elt = R.module_hidden


def torch_lce(h, W, b, y):
    h, y = _flat(h, y)
    return F.cross_entropy(F.linear(h, W, b), y)


def _torch_lce_fused(chunked: bool):
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        return None, "this torch has no F.linear_cross_entropy (needs torch >= 2.13)"
    if not chunked:
        def torch_lce_op(h, W, b, y):
            h, y = _flat(h, y)
            return fn(h, W, y, linear_bias=b)

        return torch_lce_op, ""
    opt_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if opt_cls is None:
        return None, "this torch has no torch.nn.LinearCrossEntropyOptions"
    opts = opt_cls()

    def torch_lce_chunked(h, W, b, y):
        h, y = _flat(h, y)
        return fn(h, W, y, linear_bias=b, options=opts)

    return torch_lce_chunked, ""


def torch_ce(logits, y):
    return F.cross_entropy(logits, y)


def _have(name):
    fn = getattr(ops, name, None)
    return (fn, "") if fn is not None else (None, f"charmlp.ops.{name} is missing from the installed charmlp")


@dataclass
class ArmSpec:
    name: str
    label: str
    fn: object  # callable or None (SKIPPED)
    reason: str = ""
    pytorch: bool = True  # a PyTorch baseline (charmlp is the other side)


def arms_for(layer: str) -> list[ArmSpec]:
    if layer == "elt":
        fn, why = _have("embed_linear_tanh")
        return [ArmSpec("torch", "PyTorch: tanh(F.linear(F.embedding(idx, table).flatten(1), W, b))", torch_elt),
                ArmSpec("charmlp", "charmlp.ops.embed_linear_tanh", fn, why, pytorch=False)]
    if layer == "lce":
        fn, why = _have("linear_cross_entropy")
        op, op_why = _torch_lce_fused(chunked=False)
        ch, ch_why = _torch_lce_fused(chunked=True)
        return [ArmSpec("torch", "F.linear + F.cross_entropy", torch_lce),
                ArmSpec("torch-lce", "F.linear_cross_entropy (default: options=None)", op, op_why),
                ArmSpec("torch-lce-chunked", "F.linear_cross_entropy (chunked: options=LinearCrossEntropyOptions())",
                        ch, ch_why),
                ArmSpec("charmlp", "charmlp.ops.linear_cross_entropy", fn, why, pytorch=False)]
    fn, why = _have("cross_entropy")
    return [ArmSpec("torch", "F.cross_entropy", torch_ce),
            ArmSpec("charmlp", "charmlp.ops.cross_entropy", fn, why, pytorch=False)]


#: the float64 reference of each layer: charmlp.reference (the model written down once)
REFERENCE = {"elt": R.embed_linear_tanh, "lce": R.linear_cross_entropy, "ce": R.cross_entropy}


def reference(case: Case, inp: dict) -> dict:
    """``charmlp.reference``'s layer in float64 on the same inputs: output and gradients."""
    args = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in inp["args"]]
    leaves = [a for a in args if a.is_floating_point()]
    out = REFERENCE[case.layer](*args)
    go = inp["grad_out"].double() if inp["grad_out"] is not None else None
    grads = torch.autograd.grad(out, leaves, go)
    return {"out": out.detach(), "grads": [g.detach() for g in grads]}


def fwd(fn, inp):
    with torch.no_grad():
        return fn(*inp["args"])


def fwd_bwd(fn, inp):
    out = fn(*inp["args"])
    return out, torch.autograd.grad(out, inp["leaves"], inp["grad_out"])


#: relative max error (max |arm - float64| / max |float64| per tensor): the suite's float32 limits
GATE_RTOL = {"value": SUITE_RTOL["loss"], "grads": SUITE_RTOL["grads"]}


def gate(case: Case, fn, inp: dict, ref: dict) -> dict[str, float]:
    """The arm's output (loss, or the [B, H] activations) and gradients against float64; for a
    case that times the forward alone, also its output under no_grad (a different code path in
    charmlp's ops)."""
    out, grads = fwd_bwd(fn, inp)
    errs = {"value": rel_err(out, ref["out"])}
    for n, g, r in zip(inp["leaf_names"], grads, ref["grads"]):
        errs[f"grad.{n}"] = rel_err(g, r)
    if "forward" in case.measurements:
        errs["value.no_grad"] = rel_err(fwd(fn, inp), ref["out"])
    return errs


def gate_passes(errs: dict[str, float]) -> tuple[bool, str]:
    bad = []
    for k, e in errs.items():
        lim = GATE_RTOL["value"] if k.startswith("value") else GATE_RTOL["grads"]
        if not e <= lim:
            bad.append(f"{k} rel.err {e:.2e} > {lim:.0e}")
    return (not bad), "; ".join(bad)
