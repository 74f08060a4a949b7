#!/usr/bin/env python
"""Question: what does ``loss.backward()`` cost after ``logits, loss = model(x, y)``, against
the autograd engine's own floor?

    python benchmarks/bench_backward_handover.py [--batch 32] [--rounds 400] [--threads N]

``model(x, y)``'s forward (the ``mlp_logits_cross_entropy`` op) already computed the five
parameter gradients; its backward only hands them to autograd (no copy, no scaling when the
seed is 1), and the engine's ``AccumulateGrad`` nodes set ``.grad``. Timed, each on a fresh
graph with every ``.grad`` None (as after ``opt.zero_grad()``; the graph is built in the
untimed setup of a one-call ``harness.timing.Block``), median over interleaved rounds:

- ``engine floor, 1 leaf``: ``w.sum().backward()`` for one leaf ``w`` (one ``SumBackward0``,
  one ``AccumulateGrad``): the least a backward can cost;
- ``charmlp, 1 leaf``: charmlp's backward with only ``head.bias`` requiring grad (one
  ``AccumulateGrad``): the hand-over's own cost is the difference to the floor;
- ``engine, 5 leaves``: ``(p0.sum() + ... + p4.sum()).backward()`` over the model's five
  parameters (five ``SumBackward0``, four ``AddBackward0``, five ``AccumulateGrad``);
- ``charmlp, 5 leaves``: the training loop's ``loss.backward()``; also through the logits
  (``(loss + logits.mean()).backward()``), where the backward adds their contribution.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Block, timed_rounds  # noqa: E402

import charmlp  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = charmlp.MLPLanguageModel(init="notebook")
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 27, (args.batch, 3), generator=g)
    y = torch.randint(0, 27, (args.batch,), generator=g)
    leaf = torch.randn(27, requires_grad=True)

    def only_bias(make):
        def run():
            for q in params:
                q.requires_grad_(q is model.head.bias)
            try:
                return make()
            finally:
                for q in params:
                    q.requires_grad_(True)
        return run

    arms = {
        "engine floor, 1 leaf": lambda: leaf.sum(),
        "charmlp, 1 leaf": only_bias(lambda: model(x, y)[1]),
        "engine, 5 leaves": lambda: sum(q.sum() for q in params),
        "charmlp, 5 leaves": lambda: model(x, y)[1],
        "charmlp, 5 leaves, through the logits": lambda: (lambda out: out[1] + out[0].mean())(model(x, y)),
    }

    def zero():
        leaf.grad = None
        for q in params:
            q.grad = None

    blocks = {name: Block("loss.backward()", "loss = make()\nzero()", {"make": make, "zero": zero})
              for name, make in arms.items()}
    # one call per sample, in a fixed order (one group per arm); no /proc reads between these
    # ~0.5 ms rounds: they would slow the lone calls after them (see harness.timing.timed_rounds)
    r = timed_rounds([[(name, lambda b=b: b(1) * 1e6)] for name, b in blocks.items()], args.rounds, warmup=20,
                     contention=False)
    samples = r.with_spare(args.rounds)
    print(f"loss.backward() at B={args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds:\n")
    print("| backward | median |\n|---|---|")
    for name, s in samples.items():
        print(f"| {name} | {statistics.median(s):.1f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
