#!/usr/bin/env python
"""Question: what does the whole-model loss op buy autograd users (any optimizer) and evaluation?

    python benchmarks/bench_autograd_loss.py [--sizes lecture-32,lecture-4096,lecture-full]
                                             [--rounds 15] [--device cpu] [--out DIR]

Users who train with their own optimizer (AdamW, schedules, gradient clipping) cannot use
the fused ``mlp_sgd_step``; they call ``loss.backward()``. ``MLPLanguageModel(idx, y,
return_logits=False)`` runs the whole model as one ``mlp_cross_entropy`` op, whose forward
computes the five parameter gradients while the activations are in cache (on CPU once per
distinct context of the batch) and whose backward only scales them. This script compares,
on names.txt batches, three ways to get the loss and the gradients:

- plain PyTorch: the model as an ``nn.Module`` is written, ``charmlp.reference.module_loss``
  (``F.embedding``, two ``F.linear``, tanh, ``F.cross_entropy``; the suite's ``functional`` arm);
- charmlp layer ops: ``ops.embed_linear_tanh`` then ``ops.linear_cross_entropy`` (what the
  model ran before ``mlp_cross_entropy``; still its path for dtypes without a whole-model kernel);
- charmlp ``mlp_cross_entropy``: the model's logits-free form (``return_logits=False``);
- charmlp ``forward_backward``: ``MLPLanguageModel.forward_backward``, the same op's loss and
  gradients assigned to ``.grad`` without autograd (what ``charmlp train`` runs for AdamW).

Measurements, each arm interleaved round by round (median): forward + backward
(gradients zeroed with ``set_to_none``), an AdamW training step (forward, backward,
``torch.optim.AdamW(fused=True).step``, the same in every arm), and the loss under ``torch.no_grad()``
(evaluation). Before timing, every arm's loss and gradients are checked against a float64
evaluation of the seed code (the benchmark suite's gate). Writes autograd_loss.md/.json to
--out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (LR, PARAM_NAMES, Block, Size, fmt_time, gate_errors, gate_passes, make_batch,  # noqa: E402
                     make_params, parse_size, reference, rel_err, timed_rounds)

from charmlp import ops  # noqa: E402
from charmlp import reference as R  # noqa: E402


def layer_ops_loss(idx, y, table, W1, b1, W2, b2):
    return ops.linear_cross_entropy(ops.embed_linear_tanh(idx, table, W1, b1), W2, b2, y)


def grads_without_autograd(idx, y, *params):
    """What ``MLPLanguageModel.forward_backward`` runs: the loss and the five gradients
    from one op, assigned to ``.grad`` with no autograd graph."""
    with torch.no_grad():
        loss, *grads = torch.ops.charmlp.mlp_cross_entropy_and_grads(idx, y, *params)
    for p, g in zip(params, grads):
        p.grad = g
    return loss


ARMS = {
    "plain PyTorch": R.module_loss,
    "charmlp layer ops": layer_ops_loss,
    "charmlp mlp_cross_entropy": ops.mlp_cross_entropy,
    "charmlp forward_backward": grads_without_autograd,
}
SETS_GRADS = {"charmlp forward_backward"}  # the arm's call is forward and backward in one
MEASUREMENTS = ("fwd_bwd", "adamw_step", "eval")
LABELS = {"fwd_bwd": "forward + backward", "adamw_step": "AdamW training step", "eval": "loss under no_grad"}


class Runner:
    """One arm's parameters (its own copy of the canonical weights) and its measurements."""

    def __init__(self, loss_fn, params: dict, idx, y, sets_grads: bool = False):
        self.loss_fn, self.idx, self.y, self.sets_grads = loss_fn, idx, y, sets_grads
        self.params = [params[k].clone().requires_grad_() for k in PARAM_NAMES]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, fused=True)

    def fwd_bwd(self):
        if self.sets_grads:
            return self.loss_fn(self.idx, self.y, *self.params)
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.idx, self.y, *self.params)
        loss.backward()
        return loss

    def adamw_step(self):
        loss = self.fwd_bwd()
        self.opt.step()
        return loss

    def eval(self):
        with torch.no_grad():
            if self.sets_grads:  # the loss-only op: the same as mlp_cross_entropy's arm
                return ops.mlp_cross_entropy(self.idx, self.y, *self.params)
            return self.loss_fn(self.idx, self.y, *self.params)


def check(name: str, runner: Runner, ref: dict) -> float:
    """Worst relative error of the arm's loss and gradients (and its no-grad loss) vs float64."""
    loss = runner.fwd_bwd()
    errs = gate_errors(loss, dict(zip(PARAM_NAMES, (p.grad for p in runner.params))), None, None, ref)
    errs["eval.loss"] = rel_err(runner.eval().reshape(()), ref["loss"])
    ok, why = gate_passes(errs)
    if not ok:
        raise SystemExit(f"{name}: FAILED the correctness gate: {why}")
    return max(errs.values())


def bench(size: Size, rounds: int, device: torch.device) -> dict:
    idx, y, source = make_batch(size, "names", device)
    params = make_params(size, device)
    ref = reference({k: v.cpu() for k, v in params.items()}, idx.cpu(), y.cpu(), LR)
    res = {"size": size.name, "label": f"{size.family} (T={size.T},E={size.E},H={size.H})", "data": source, "rows": idx.shape[0], "errors": {},
           "median_s": {m: {} for m in MEASUREMENTS}}
    runners = {}
    for name, fn in ARMS.items():
        runners[name] = Runner(fn, params, idx, y, sets_grads=name in SETS_GRADS)
        res["errors"][name] = check(name, runners[name], ref)
    # (forward_backward's no_grad loss is mlp_cross_entropy's: not timed twice)
    jobs = [(name, m) for m in MEASUREMENTS for name in ARMS if not (m == "eval" and name in SETS_GRADS)]
    blocks, inner = {}, {}
    for name, m in jobs:  # warm-up, and calls per timed block (~2 ms)
        blocks[(name, m)] = block = Block(getattr(runners[name], m), device=device)
        block(3)
        inner[(name, m)] = max(1, min(1000, int(2e-3 / max(block(1), 1e-7))))
    # one group: the order of every (arm, measurement) rotates each round; disturbed rounds are redone
    r = timed_rounds([[(job, lambda job=job: blocks[job](inner[job])) for job in jobs]], rounds)
    for (name, m), s in r.with_spare(rounds).items():
        res["median_s"][m][name] = statistics.median(s)
    return res


def table(results: list[dict], m: str) -> list[str]:
    names = [n for n in ARMS if n in results[0]["median_s"][m]]
    L = [f"### {LABELS[m]}", "", "| size | rows | " + " | ".join(names) + " | mlp_cross_entropy vs layer ops |",
         "|---|---|" + "---|" * (len(names) + 1)]
    for r in results:
        t = r["median_s"][m]
        base = t["plain PyTorch"]
        cells = [f"{fmt_time(t[n])} ({base / t[n]:.2f}x)" for n in names]
        L.append(f"| {r['label']} | {r['rows']:,} | " + " | ".join(cells)
                 + f" | {t['charmlp layer ops'] / t['charmlp mlp_cross_entropy']:.2f}x |")
    return L + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="lecture-32,lecture-256,lecture-4096,lecture-32768,lecture-full,large-4096")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per size (each arm once per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for autograd_loss.md / .json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    results = []
    for spec in args.sizes.split(","):
        r = bench(parse_size(spec), args.rounds, device)
        results.append(r)
        print(f"{r['size']}: " + "; ".join(
            f"{m}: " + ", ".join(f"{n} {fmt_time(v)}" for n, v in r["median_s"][m].items())
            for m in MEASUREMENTS), flush=True)
    lines = ["# The whole-model loss op under autograd", "",
             f"`python benchmarks/bench_autograd_loss.py` on {device.type} ({threads} torch threads), names.txt "
             "batches: median time per call, arms interleaved round by round, speedup vs plain PyTorch in "
             "brackets. `forward_backward` runs no autograd (its no-grad loss is `mlp_cross_entropy`'s). Every arm's "
             "loss and five gradients (and its no-grad loss) passed the suite's gate against float64 first; worst "
             "relative errors: " + "; ".join(
                 f"{n} {max(r['errors'][n] for r in results):.1e}" for n in ARMS) + ".", ""]
    for m in MEASUREMENTS:
        lines += table(results, m)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "autograd_loss.md").write_text("\n".join(lines))
        (out / "autograd_loss.json").write_text(json.dumps({"threads": threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
