#!/usr/bin/env python
"""Question: how fast is the training loop users already write, with charmlp's model swapped in?

    python benchmarks/bench_idiomatic_loop.py [--batch 32,256,4096,0] [--data names,random]
                                              [--optimizer sgd,adamw] [--budget 8] [--threads N]
                                              [--quick] [--out DIR]

The loop is makemore's, unchanged but for the model (``charmlp.MLPLanguageModel(init="notebook")``):

    logits, loss = model(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()

with ``torch.optim.SGD(lr=0.1)`` or ``torch.optim.AdamW()`` (torch's defaults). Arms, each a
full training step on its own copy of the notebook's weights with its own optimizer:

- ``seed``: the lecture notebook's loop on raw tensors (W1 ``[T*E, H]``, W2 ``[H, V]``):
  ``C[X]``, ``tanh(emb.view(-1, 30) @ W1 + b1)``, ``h @ W2 + b2``, ``F.cross_entropy``; SGD:
  ``p.grad = None``, ``loss.backward()``, ``p.data += -lr * p.grad`` (``charmlp.reference.notebook_step``);
  AdamW: the same forward (``notebook_loss``) and tensors under ``torch.optim.AdamW`` (``zero_grad``,
  ``backward``, ``step``). The reference of every ratio.
- ``plain``: the four lines with ``MLPLanguageModel(fused=False)`` (charmlp's model through
  plain PyTorch ops): what charmlp must never be slower than.
- ``charmlp``: the four lines with ``MLPLanguageModel(fused=True)``: what a user gets without
  changing their code.
- going further, bespoke calls: ``forward_backward`` (``model.forward_backward(x, y)`` +
  ``opt.step()``) and, for SGD, ``sgd_step`` (``model.sgd_step(x, y, 0.1)``, one fused op).

Gate first: one step of every arm from the same weights on the same batch, against the same
step in float64 (``fused=False``, the same optimizer): loss within 1e-5 relative, every
parameter's update (SGD) or gradient (AdamW) within 1e-3 of the largest. Then rounds in which every arm runs one
block of back-to-back steps (~2 ms, at least one step) on the size's batch, the arm order
rotating each round, as many rounds as fit ``--budget`` (at least 3); rounds during which
other processes took more than 5 % of the CPUs are redone, up to 3x (the suite's
``harness.timing.timed_rounds``). Reported: median time per step and the speed-up over
``seed``. Writes idiomatic_loop.md / .json to --out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Block, Size, environment, fmt_time, make_batch, summarize, timed_rounds  # noqa: E402

import charmlp  # noqa: E402
from charmlp import reference as R  # noqa: E402

V, T, E, HID = 27, 3, 10, 200
LR = {"sgd": 0.1, "adamw": 1e-3}
OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=LR["sgd"]), "adamw": lambda ps: torch.optim.AdamW(ps)}
ARMS = ("seed", "plain", "charmlp", "forward_backward", "sgd_step")
GATE = {"loss": 1e-5, "update": 1e-3}  # errors are reported as fractions of these limits


class Loop:
    """One arm: a model (or the notebook's tensors), its optimizer and its step."""

    def __init__(self, arm: str, optimizer: str, dtype=torch.float32):
        self.arm, self.optimizer = arm, optimizer
        self.model = charmlp.MLPLanguageModel(V, T, E, HID, fused=arm != "plain", init="notebook").to(dtype)
        if arm == "seed":  # the notebook's tensors, W1 and W2 as drawn ([T*E, H], [H, V])
            m = self.model
            self.tensors = [m.embed.table.detach().clone(), m.embed.weight.detach().T.contiguous(),
                            m.embed.bias.detach().clone(), m.head.weight.detach().T.contiguous(),
                            m.head.bias.detach().clone()]
            for t in self.tensors:
                t.requires_grad_()
            self.opt = OPTIMIZERS[optimizer](self.tensors) if optimizer == "adamw" else None
        else:
            self.opt = OPTIMIZERS[optimizer](self.model.parameters())
        self.step = getattr(self, "_" + arm)

    def params(self) -> list[torch.Tensor]:
        """In charmlp's layout."""
        if self.arm == "seed":
            C, W1, b1, W2, b2 = (t.detach() for t in self.tensors)
            return [C, W1.T, b1, W2.T, b2]
        return [p.detach() for p in self.model._step_parameters()]

    def grads(self) -> list[torch.Tensor]:
        if self.arm == "seed":
            C, W1, b1, W2, b2 = (t.grad for t in self.tensors)
            return [C, W1.T, b1, W2.T, b2]
        return [p.grad for p in self.model._step_parameters()]

    def _seed(self, x, y):
        if self.opt is None:
            return R.notebook_step(self.tensors, x, y, LR["sgd"])
        loss = R.notebook_loss(self.tensors, x, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss

    def _idiomatic(self, x, y):
        logits, loss = self.model(x, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss

    _plain = _charmlp = _idiomatic

    def _forward_backward(self, x, y):
        loss = self.model.forward_backward(x, y)
        self.opt.step()
        return loss

    def _sgd_step(self, x, y):
        return self.model.sgd_step(x, y, LR["sgd"])


def arms_for(optimizer: str) -> list[str]:
    return [a for a in ARMS if optimizer == "sgd" or a != "sgd_step"]


def gate(optimizer: str, x, y) -> dict[str, float]:
    """Worst relative error of each arm's first step against the float64 plain model's: the
    loss, and the update of every parameter (SGD) or the gradient AdamW was given (AdamW's
    first update, ~lr * sign(g), is ill-conditioned where g is ~0)."""
    ref = Loop("plain", optimizer, torch.float64)
    before = [p.clone() for p in ref.params()]
    ref_loss = ref.step(x, y).item()
    ref_moves = [a - b for a, b in zip(ref.params(), before)] if optimizer == "sgd" else ref.grads()
    errs = {}
    for arm in arms_for(optimizer):
        loop = Loop(arm, optimizer)
        start = [p.double() for p in loop.params()]
        loss = loop.step(x, y).item()
        moves = ([p.double() - s for p, s in zip(loop.params(), start)] if optimizer == "sgd"
                 else [g.double() for g in loop.grads()])
        err = abs(loss - ref_loss) / abs(ref_loss) / GATE["loss"]
        for m, r in zip(moves, ref_moves):
            err = max(err, (m - r).abs().max().item() / (r.abs().max().item() or 1.0) / GATE["update"])
        errs[arm] = err
    return errs


def bench(optimizer: str, B: int, data: str, budget: float, warmup: int) -> dict:
    size = Size(f"lecture-{B or 'full'}", T, E, HID, V, B)
    x, y, source = make_batch(size, data, torch.device("cpu"))
    errs = gate(optimizer, x, y)
    failed = {a: e for a, e in errs.items() if not e <= 1.0}
    if failed:
        raise SystemExit(f"gate failed ({optimizer}, B={B}, {data}): {failed}")
    loops = {a: Loop(a, optimizer) for a in arms_for(optimizer)}
    blocks = {a: Block("step(x, y)", globals={"step": loop.step, "x": x, "y": y}) for a, loop in loops.items()}
    for block in blocks.values():  # the first step creates the optimizer state
        block(1)
    per_call = {a: block(1) for a, block in blocks.items()}
    inner = {a: max(1, min(64, round(2e-3 / t))) for a, t in per_call.items()}
    jobs = [(a, lambda a=a: blocks[a](inner[a])) for a in loops]
    warm = timed_rounds([jobs], max(warmup, 1)).with_spare()  # warm-up rounds: they size the timed phase
    round_s = sum(statistics.median(warm[a]) * inner[a] for a in loops)
    rounds = max(3, int(budget / max(round_s, 1e-9)))  # as many rounds as fit the budget
    r = timed_rounds([jobs], rounds)
    stats = {a: summarize(s) for a, s in r.with_spare(rounds).items()}
    seed = stats["seed"]["median_s"]
    for a in stats:
        stats[a]["speedup_vs_seed"] = seed / stats[a]["median_s"]
    return {"optimizer": optimizer, "B": x.shape[0], "data": data, "source": source, "gate": errs,
            "inner": inner, "stats": stats}


def table(results: list[dict], optimizer: str, data: str) -> list[str]:
    rows = [r for r in results if r["optimizer"] == optimizer and r["data"] == data]
    if not rows:
        return []
    arms = arms_for(optimizer)
    head = "| arm | " + " | ".join(f"B={r['B']:,}" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    for a in arms:
        cells = []
        for r in rows:
            s = r["stats"][a]
            t = fmt_time(s["median_s"])
            cells.append(t if a == "seed" else f"{t} ({s['speedup_vs_seed']:.2f}x)")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def render(results: list[dict], env: dict, command: str) -> str:
    out = ["# The idiomatic training loop", "",
           "`logits, loss = model(x, y); opt.zero_grad(); loss.backward(); opt.step()`, median time per",
           "step (speed-up over the seed notebook's loop). `plain` is the same loop on `fused=False`; ",
           "`forward_backward` and `sgd_step` are charmlp's bespoke calls. See the script's docstring.", "",
           f"`{command}`; torch {env['torch']}, {env['cpu_model']}, {env['threads']} threads, "
           f"charmlp CPU kernels: {env.get('cpu_capability', '?')}"
           + (f" ({env['env']})" if env["env"] else "") + f", {env['date']}.", ""]
    for optimizer in ("sgd", "adamw"):
        for data in ("names", "random"):
            lines = table(results, optimizer, data)
            if lines:
                src = next(r["source"] for r in results if r["optimizer"] == optimizer and r["data"] == data)
                opt = "torch.optim.SGD(lr=0.1)" if optimizer == "sgd" else "torch.optim.AdamW() (defaults)"
                out += [f"## {opt}, {src}", ""] + lines + [""]
    worst = max(e for r in results for e in r["gate"].values())
    out.append(f"Gate: every arm's first step against the float64 step: worst error {worst:.2f} of the limit "
               "(loss 1e-5 relative; SGD's updates, AdamW's gradients 1e-3 of the largest).")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="32,256,4096,0", help="comma-separated batch sizes; 0 = every row (228,146)")
    p.add_argument("--data", default="names,random", help="names and/or random")
    p.add_argument("--optimizer", default="sgd,adamw")
    p.add_argument("--budget", type=float, default=8.0, help="timed seconds per (optimizer, batch, data)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 0.3 s budgets, 1 warm-up round")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget, warmup = (0.3, 1) if args.quick else (args.budget, args.warmup)
    env = environment(torch.device("cpu"), torch.get_num_threads())
    results = []
    for optimizer in args.optimizer.split(","):
        for data in args.data.split(","):
            for B in (int(b) for b in args.batch.split(",")):
                r = bench(optimizer, B, data, budget, warmup)
                results.append(r)
                print(f"{optimizer:5s} {data:6s} B={r['B']:>7,}: " + ", ".join(
                    f"{a} {fmt_time(s['median_s'])} ({s['speedup_vs_seed']:.2f}x)" for a, s in r["stats"].items()),
                    flush=True)
    command = "python benchmarks/bench_idiomatic_loop.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = render(results, env, command.strip())
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "idiomatic_loop.md").write_text(md)
        (out / "idiomatic_loop.json").write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
