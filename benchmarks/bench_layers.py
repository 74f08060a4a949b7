#!/usr/bin/env python
"""Question: how fast are charmlp's three drop-in layer ops against the PyTorch code each replaces?

    python benchmarks/bench_layers.py [--layers elt,lce,ce] [--quick] [--out DIR] [--threads N]
                                      [--budget SECONDS] [--repeats N] [--block-ms MS] [--no-memory]

Each layer on the issue's shape grid, op against op on the same float32 inputs:

- ``elt``: ``charmlp.ops.embed_linear_tanh(idx, table, W, b)`` vs
  ``torch.tanh(F.linear(F.embedding(idx, table).flatten(1), W, b))`` (``charmlp.reference.module_hidden``,
  the model's first layer as an ``nn.Module`` is written); forward + backward
  (``torch.autograd.grad`` of the ``[B, H]`` output w.r.t. table, W and b with one fixed random
  upstream gradient, the same for both arms). B in {32, 4096, 65536} (``--quick`` drops 65536);
  (T, E, H, V) = lecture (3, 10, 200, 27), wide (8, 64, 1024, 27), Bengio's two Brown-corpus
  models (4, 30, 100, 16383) and (4, 60, 50, 16383), his AP News model (5, 100, 60, 17964).
- ``lce``: ``charmlp.ops.linear_cross_entropy(h, W, b, y)`` vs ``F.cross_entropy(F.linear(h, W, b), y)``,
  vs torch's ``F.linear_cross_entropy(h, W, y, linear_bias=b)`` (torch >= 2.13; its default,
  ``options=None``, is the reference path) and vs the same with
  ``options=torch.nn.LinearCrossEntropyOptions()`` (torch's chunked path, which never stores the
  logits either); forward + backward (gradients of h, W, b). B in {32, 4096}; (H, V) in
  {(200, 27), (1024, 27), (100, 16383), (512, 32000), (1024, 50257)}; plus h [8, 512, 512] with
  V = 32000 (a sequence model's head: charmlp takes [B, T, H] with [B, T] targets; torch's
  arms get the flattened [B*T, H], as torch's op accepts only 1-D or 2-D input). Also the peak
  memory of one forward + backward at V >= 16k, each arm in a fresh process (resident-set growth,
  the harness's method: see ``harness.memory.rss_probe``).
- ``ce``: ``charmlp.ops.cross_entropy(logits, y)`` vs ``F.cross_entropy(logits, y)``: forward alone
  (under ``torch.no_grad()``) and forward + backward (gradient of the logits). B in {32, 4096};
  V in {27, 16383, 32000, 50257}.

Method (the suite's): every arm is first checked against a float64 evaluation of the PyTorch
composition (``charmlp.reference``) on the same inputs (values and gradients; an arm that fails is
reported FAILED and not timed); then the arms run interleaved in this process, in an order that
rotates every round, each timed sample a block of back-to-back calls of one arm lasting about
``--block-ms`` (one call at large sizes); rounds during which other processes used the CPUs are
dropped and redone (within limits); medians. Writes ``layers.md``, ``layers.json`` and ``layers.png`` to ``--out``
(default ``benchmarks/results/<device>/``). The parts live in ``benchmarks/layers/`` (grid, arms,
timing, targets, report, plot); this script is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Config, cpu_model, default_outdir, environment, loadavg  # noqa: E402
from layers.arms import GATE_RTOL  # noqa: E402
from layers.bench import bench_case, lce_memory, mem_probe  # noqa: E402
from layers.cases import LAYERS, MEMORY_MIN_V, SMOKE, grid  # noqa: E402
from layers.report import write_report  # noqa: E402
from layers.targets import TARGETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated: elt, lce, ce (default: all)")
    p.add_argument("--quick", action="store_true", help="drop B=65536 and time fewer rounds (1 s per case)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--budget", type=float, default=None, help="timed seconds per case (default 5, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="fixed number of timed rounds (overrides --budget)")
    p.add_argument("--block-ms", type=float, default=2.0,
                   help="a timed sample is a block of back-to-back calls lasting about this long (default 2; 0: one call)")
    p.add_argument("--no-memory", action="store_true", help="skip the LCE peak-memory probes")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes, 2 rounds
    p.add_argument("--mem-probe", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process probe
    p.add_argument("--render", default=None, metavar="JSON",
                   help="no measuring: rewrite layers.md/.png (to --out, default beside JSON) from a layers.json")
    args = p.parse_args(argv)
    args.layer_list = [x.strip() for x in args.layers.split(",") if x.strip()]
    bad = [x for x in args.layer_list if x not in LAYERS]
    if bad:
        p.error(f"unknown layer(s) {bad}; use {', '.join(LAYERS)}")
    return args


def make_config(args) -> Config:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, threads = torch.device("cpu"), torch.get_num_threads()
    if args.smoke:
        cfg = Config(device=dev, threads=threads, quick=True, budget_s=0.05, min_repeats=2, max_repeats=2,
                     warmup_rounds=1, data="random")
    elif args.quick:
        cfg = Config(device=dev, threads=threads, quick=True, budget_s=1.0, min_repeats=3, max_repeats=50,
                     warmup_rounds=1, data="random")
    else:
        cfg = Config(device=dev, threads=threads, budget_s=5.0, min_repeats=3, max_repeats=200,
                     warmup_rounds=2, data="random")
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.repeats is not None:
        cfg.min_repeats = cfg.max_repeats = args.repeats
    cfg.block_s = args.block_ms / 1e3
    cfg.memory = not args.no_memory
    return cfg


def run(args, cfg: Config, command: str) -> dict:
    """Every case of the grid: gated, timed, and (LCE at large V) its peak memory."""
    log = lambda s: print(s, flush=True)  # noqa: E731
    mem_min_v = SMOKE["memory_min_v"] if args.smoke else MEMORY_MIN_V
    t0 = time.perf_counter()
    res = {"command": command, "environment": environment(cfg.device, cfg.threads),
           "config": {"layers": args.layer_list, "quick": args.quick, "smoke": args.smoke, "budget_s": cfg.budget_s,
                      "min_repeats": cfg.min_repeats, "max_repeats": cfg.max_repeats,
                      "warmup_rounds": cfg.warmup_rounds, "block_s": cfg.block_s, "seed": cfg.seed,
                      "memory": cfg.memory, "memory_min_v": mem_min_v,
                      "memory_target_min_rows": 8 if args.smoke else 4096,
                      "gate_rtol": GATE_RTOL},
           "targets_text": TARGETS, "cases": []}
    log(f"bench_layers on cpu ({cpu_model()}), {cfg.threads} torch threads, torch {torch.__version__}")
    for case in grid(args.layer_list, quick=args.quick, smoke=args.smoke):
        rec = bench_case(case, cfg, log=log, redo=not args.smoke)
        if cfg.memory and case.layer == "lce" and case.V >= mem_min_v:
            names = [n for n, a in rec["arms"].items() if a["status"] == "PASS"
                     and (not args.smoke or n in ("torch", "charmlp"))]  # smoke: two fresh processes
            rec["memory"] = lce_memory(case, names, cfg, log=log, parallel=args.smoke)
        res["cases"].append(rec)
    res["environment"]["loadavg_end"] = loadavg()
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.mem_probe:
        print(json.dumps(mem_probe(json.loads(args.mem_probe))))
        return
    if args.render:
        src = Path(args.render)
        res = json.loads(src.read_text())
        files = write_report(res, Path(args.out) if args.out else src.parent)
        print("wrote " + ", ".join(str(f) for f in files.values()))
        return
    cfg = make_config(args)
    command = ("python benchmarks/bench_layers.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    res = run(args, cfg, command)
    out = Path(args.out) if args.out else default_outdir(cfg.device)
    files = write_report(res, out)
    print()
    print((out / "layers.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))


if __name__ == "__main__":
    main()
