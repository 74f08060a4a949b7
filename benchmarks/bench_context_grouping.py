#!/usr/bin/env python
"""Question: what does the CPU training step's context grouping buy, and on what data?

    python benchmarks/bench_context_grouping.py [--sizes lecture-256,lecture-4096,lecture-full]
                                                [--rounds 15] [--out DIR]

mlp_sgd_step on CPU runs once per distinct context of the batch (with the rows' target
counts) when that pays; charmlp._C._set_context_grouping switches it off. For names.txt
batches and for uniformly random contexts, at each size: the number of distinct contexts,
a correctness check (the grouped step against the ungrouped one, then both against a
float64 evaluation of the seed notebook's step), and the step time with grouping on and
off, interleaved round by round (median, with the seed notebook's eager step for scale).
Writes context_grouping.md (and .json) to --out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (PARAM_NAMES, Block, Size, fmt_time, gate_errors, make_batch, make_params, parse_size,  # noqa: E402
                     reference, rel_err, timed_rounds)

from charmlp import _C, ops  # noqa: E402
from charmlp import reference as R  # noqa: E402

LR = 0.1


def step_fn(params: dict, idx, y, grouping: bool):
    """One fused step on copies of the canonical weights; returns (fn, copies) for timing."""
    copies = [params[k].clone() for k in PARAM_NAMES]

    def fn():
        _C._set_context_grouping(grouping)
        return ops.mlp_sgd_step(idx, y, *copies, LR)

    return fn, copies


def seed_step_fn(params: dict, idx, y):
    """The notebook's eager step (``charmlp.reference.notebook_step``; W1 [T*E, H], W2 [H, V]
    layout) for scale."""
    C = params["table"].clone().requires_grad_()
    W1 = params["W1"].t().contiguous().requires_grad_()
    b1 = params["b1"].clone().requires_grad_()
    W2 = params["W2"].t().contiguous().requires_grad_()
    b2 = params["b2"].clone().requires_grad_()
    ps = [C, W1, b1, W2, b2]

    def fn():
        """One step; returns the parameters in charmlp's layout (for the correctness check)."""
        R.notebook_step(ps, idx, y, LR)
        return {"table": C.detach(), "W1": W1.detach().t(), "b1": b1.detach(), "W2": W2.detach().t(),
                "b2": b2.detach()}

    return fn


def check(params: dict, idx, y) -> dict:
    """Max relative error of the grouped step's loss and applied gradients ((before - after)
    / lr) against the ungrouped step's and against float64; raises if the grouped step
    fails the suite's correctness gate."""
    runs = {}
    for grouping in (True, False):
        fn, copies = step_fn(params, idx, y, grouping)
        loss = fn()
        applied = [(params[k].double() - c.double()) / LR for k, c in zip(PARAM_NAMES, copies)]
        runs[grouping] = (loss, dict(zip(PARAM_NAMES, copies)), applied)
    ref = reference(params, idx, y, LR)
    on, off = runs[True], runs[False]
    vs_off = [rel_err(on[0].reshape(()), off[0].double().reshape(()))]
    vs_off += [rel_err(a, b) for a, b in zip(on[2], off[2])]
    errs = gate_errors(None, None, on[1], on[0], ref, start=params, lr=LR)
    # The float32 noise floor: the seed notebook's own float32 step against float64.
    seed = seed_step_fn(params, idx, y)
    seed_params = seed()
    seed_errs = gate_errors(None, None, seed_params, None, ref, start=params, lr=LR)
    return {"grouped_vs_ungrouped": max(vs_off), "grouped_vs_float64": max(errs.values()),
            "seed_vs_float64": max(seed_errs.values())}


def bench(size: Size, data: str, rounds: int, threads: int) -> dict:
    idx, y, source = make_batch(size, data, torch.device("cpu"))
    params = make_params(size, torch.device("cpu"))
    T = idx.shape[1]
    keys = (idx * torch.tensor([size.V ** (T - 1 - j) for j in range(T)])).sum(1)
    res = {"size": size.name, "data": source, "rows": idx.shape[0], "distinct": int(keys.unique().numel())}
    res.update(check(params, idx, y))
    arms = {"seed eager": seed_step_fn(params, idx, y),
            "charmlp, grouping on": step_fn(params, idx, y, True)[0],
            "charmlp, grouping off": step_fn(params, idx, y, False)[0]}
    blocks, inner = {}, {}
    for name, fn in arms.items():  # warm-up, and calls per timed block (~2 ms)
        blocks[name] = block = Block(fn)
        block(3)
        inner[name] = max(1, min(1000, int(2e-3 / max(block(1), 1e-7))))
    # the order rotates each round; rounds disturbed by other processes are redone
    r = timed_rounds([[(name, lambda name=name: blocks[name](inner[name])) for name in arms]], rounds)
    _C._set_context_grouping(True)
    res["median_s"] = {name: statistics.median(s) for name, s in r.with_spare(rounds).items()}
    res["threads"] = threads
    return res


def table(results: list[dict]) -> list[str]:
    L = ["| size | data | rows | distinct contexts | seed eager | grouping off | grouping on | on vs off | "
         "on vs seed | max rel. err: grouped vs ungrouped / grouped vs float64 / seed vs float64 |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["median_s"]
        on, off, seed = m["charmlp, grouping on"], m["charmlp, grouping off"], m["seed eager"]
        L.append(f"| {r['size']} | {r['data']} | {r['rows']:,} | {r['distinct']:,} | {fmt_time(seed)} | "
                 f"{fmt_time(off)} | {fmt_time(on)} | {off / on:.2f}x | {seed / on:.1f}x | "
                 f"{r['grouped_vs_ungrouped']:.1e} / {r['grouped_vs_float64']:.1e} / {r['seed_vs_float64']:.1e} |")
    return L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="lecture-256,lecture-4096,lecture-32768,lecture-full")
    p.add_argument("--data", default="names,random", help="comma-separated: names, random")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per size (each arm once per round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for context_grouping.md / .json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    results = []
    for data in args.data.split(","):
        for spec in args.sizes.split(","):
            r = bench(parse_size(spec), data, args.rounds, threads)
            results.append(r)
            print(f"{r['size']} {data}: {r['distinct']:,} distinct of {r['rows']:,}; "
                  + ", ".join(f"{k} {fmt_time(v)}" for k, v in r["median_s"].items()), flush=True)
    lines = ["# Context grouping in the CPU training step", "",
             f"`python benchmarks/bench_context_grouping.py` ({threads} threads): median time of one "
             "`mlp_sgd_step` with `charmlp._C._set_context_grouping` on and off, interleaved round by round; "
             "the seed notebook's eager step for scale. Grouping is exact: the last column compares the "
             "grouped step's loss and applied gradients ((before - after) / lr) with the ungrouped step's and "
             "with a float64 evaluation of the seed code, next to the seed code's own float32 error (the noise "
             "floor). Rows grouped only where 'distinct' is at most 3/4 of 'rows'.", ""] + table(results)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "context_grouping.md").write_text("\n".join(lines) + "\n")
        (out / "context_grouping.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
