#!/usr/bin/env python
"""Question: what does fusing the output projection with the loss buy, on its own?

    python benchmarks/bench_output_layer.py [--sizes lecture-32,lecture-full] [--quick]

Op-level arms on the same hidden states h [B, H], weight [V, H], bias [V], targets [B]:
``torch`` = F.cross_entropy(F.linear(h, W, b), y); ``torch-lce`` = torch's own
F.linear_cross_entropy(h, W, y, linear_bias=b) (torch >= 2.13); ``charmlp-ce`` = charmlp.ops.cross_entropy
after F.linear; ``charmlp-lce`` = charmlp.ops.linear_cross_entropy(h, W, b, y) (logits never
stored). Each is gated (loss and the gradients of h, W, b against float64), then forward
(under ``torch.no_grad()``: the loss alone) and forward+backward are timed interleaved; the peak memory of forward+backward is measured like
the training step's. An op that the installed charmlp lacks is reported as SKIPPED.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (Block, Config, Size, arg_parser, config_from_args, fmt_bytes, fmt_time, gate_passes,  # noqa: E402
                     make_batch, make_params, peak_memory, rel_err, summarize, timed_rounds)

import charmlp  # noqa: E402
from charmlp import reference as R  # noqa: E402

DEFAULT_SIZES = "lecture-32,lecture-4096,lecture-full,large-4096"


def _arms():
    # `torch` is the PyTorch pair this op-level question is about, F.linear + F.cross_entropy as
    # they are (charmlp.reference.linear_cross_entropy's shape-generic reshapes are not its work)
    arms = {"torch": (lambda h, W, b, y: F.cross_entropy(F.linear(h, W, b), y), "")}
    # torch's own fused op (torch >= 2.13: chunked, pure PyTorch), the first thing a user compares against
    tlce = getattr(F, "linear_cross_entropy", None)
    arms["torch-lce"] = ((lambda h, W, b, y: tlce(h, W, y, linear_bias=b)) if tlce else None,
                         "" if tlce else "this torch has no F.linear_cross_entropy")
    ce = getattr(charmlp.ops, "cross_entropy", None)
    arms["charmlp-ce"] = ((lambda h, W, b, y: ce(F.linear(h, W, b), y)) if ce else None,
                          "" if ce else "charmlp.ops.cross_entropy is missing")
    lce = getattr(charmlp.ops, "linear_cross_entropy", None)
    arms["charmlp-lce"] = ((lambda h, W, b, y: lce(h, W, b, y)) if lce else None,
                           "" if lce else "charmlp.ops.linear_cross_entropy is missing")
    return arms


def _inputs(size: Size, cfg: Config):
    """(idx, y, source, leaves [h, W2, b2], float64 reference (loss, grads)) of one size; h = the
    model's own hidden states for the batch (charmlp.reference's first layer)."""
    idx, y, source = make_batch(size, cfg.data, cfg.device, cfg.seed)
    params = make_params(size, cfg.device)
    with torch.no_grad():
        h0 = R.embed_linear_tanh(idx, params["table"], params["W1"], params["b1"])
    leaves = [t.clone().requires_grad_() for t in (h0, params["W2"], params["b2"])]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    loss = R.linear_cross_entropy(*ref, y)
    return idx, y, source, leaves, (loss.detach(), torch.autograd.grad(loss, ref))


def _gate(rec: dict, leaves, y, ref, log) -> dict:
    """Gates every op (loss and the gradients of h, W, b against float64); returns the passing ones."""
    live = {}
    for name, (fn, why) in _arms().items():
        r = {"status": "SKIPPED", "reason": why, "times": {}, "gate": {}, "peak_memory_bytes": None}
        rec["arms"][name] = r
        if fn is None:
            continue
        try:
            for t in leaves:
                t.grad = None
            loss = fn(*leaves, y)
            grads = torch.autograd.grad(loss, leaves)
            r["gate"] = {"loss": rel_err(loss, ref[0])}
            r["gate"].update({f"grad.{k}": rel_err(g, g_ref) for k, g, g_ref in zip("hWb", grads, ref[1])})
        except Exception as e:
            r["status"], r["reason"] = "ERROR", f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        ok, bad = gate_passes(r["gate"])
        r["status"], r["reason"] = ("PASS", "") if ok else ("FAILED", bad)
        log(f"  {name:12s} {r['status']} {bad}")
        if ok:
            live[name] = fn
    return live


def _time(rec: dict, live: dict, leaves, y, cfg: Config) -> None:
    """Forward (under no_grad: the loss alone, as in evaluation; with grad enabled charmlp's
    scalar-loss forward also computes the gradients, so the training cost is forward+backward)
    and forward+backward of every op, interleaved; rounds sized from the warm-up's."""
    g = {"leaves": leaves, "y": y}
    stmts = {"forward": "fn(*leaves, y)", "fwd_bwd": "torch.autograd.grad(fn(*leaves, y), leaves)"}
    blocks = {(n, m): Block(stmt, "pass", {**g, "fn": fn}, cfg.device) for n, fn in live.items()
              for m, stmt in stmts.items()}

    def sample(key):
        if key[1] == "forward":
            with torch.no_grad():
                return blocks[key](1)
        return blocks[key](1)

    plan = [(n, m) for m in ("forward", "fwd_bwd") for n in live]
    round_s = sum(sample(k) for _ in range(cfg.warmup_rounds) for k in plan) / max(cfg.warmup_rounds, 1)
    reps = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9)))) if plan else 0
    groups = [[((n, m), lambda k=(n, m): sample(k)) for n in live] for m in ("forward", "fwd_bwd")]
    r = timed_rounds([grp for grp in groups if grp], reps)  # rounds disturbed by other processes are redone
    contended = r.kept < reps
    rec["contention"] = {"kept_rounds": r.kept, "dropped_rounds": r.dropped, "contended": contended}
    for (n, m), s in (r.with_spare() if contended else r.samples).items():
        rec["arms"][n]["times"][m] = summarize(s)
    rec["repeats"] = reps


def bench_output_layer(sizes: list[Size], cfg: Config, log=print) -> dict:
    out = {"sizes": []}
    for size in sizes:
        idx, y, source, leaves, ref = _inputs(size, cfg)
        B = idx.shape[0]
        rec = {"name": size.name, "size": dataclasses.asdict(size), "B": B, "data": source, "arms": {}}
        log(f"[output layer {size.name}] B={B:,} H={size.H} V={size.V}")
        live = _gate(rec, leaves, y, ref, log)
        _time(rec, live, leaves, y, cfg)
        if cfg.memory:
            for n, fn in live.items():
                rec["arms"][n]["peak_memory_bytes"] = peak_memory(
                    lambda: torch.autograd.grad(fn(*leaves, y), leaves), cfg.device)
        out["sizes"].append(rec)
    return out


def output_layer_table(res: dict) -> list[str]:
    arms = list(_arms())
    head = ["size"] + [f"{m} {a}" for m in ("fwd", "fwd+bwd") for a in arms] + [f"peak mem {a}" for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sizes"]:
        z = s["size"]
        row = [f"{s['name'].split('-')[0]} (H={z['H']},V={z['V']}) B={s['B']:,}"]
        for m in ("forward", "fwd_bwd"):
            base = s["arms"]["torch"]["times"].get(m, {}).get("median_s")
            for a in arms:
                r = s["arms"][a]
                t = r["times"].get(m, {}).get("median_s")
                row.append(f"{fmt_time(t)}" + (f" ({base / t:.2f}x)" if t and base else "") if t else r["status"])
        base = s["arms"]["torch"]["peak_memory_bytes"]
        for a in arms:
            b = s["arms"][a]["peak_memory_bytes"]
            row.append(fmt_bytes(b) + (f" ({b / base:.2f}x)" if b is not None and base else "") if b is not None else s["arms"][a]["status"])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv=None):
    args = arg_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    if args.sizes is None:
        args.sizes = DEFAULT_SIZES
    cfg, sizes, _ = config_from_args(args)
    res = bench_output_layer(sizes, cfg)
    print()
    print("\n".join(output_layer_table(res)))


if __name__ == "__main__":
    main()
