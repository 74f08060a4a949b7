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

import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import charmlp  # noqa: E402

DEFAULT_SIZES = "lecture-32,lecture-4096,lecture-full,large-4096"


def _arms():
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


def bench_output_layer(sizes: list[H.Size], cfg: H.Config, log=print) -> dict:
    dev = cfg.device
    timer = H.Timer(dev)
    out = {"sizes": []}
    for size in sizes:
        idx, y, source = H.make_batch(size, cfg.data, dev, cfg.seed)
        B = idx.shape[0]
        params = H.make_params(size, dev)
        with torch.no_grad():  # realistic hidden states: the model's own first layer
            emb = params["table"][idx].view(B, -1)
            h0 = torch.tanh(F.linear(emb, params["W1"], params["b1"]))
        W0, b0 = params["W2"], params["b2"]
        # float64 reference
        hr, Wr, br = (t.double().requires_grad_() for t in (h0, W0, b0))
        lr_ = F.cross_entropy(F.linear(hr, Wr, br), y)
        gr = torch.autograd.grad(lr_, (hr, Wr, br))
        leaves = [t.clone().requires_grad_() for t in (h0, W0, b0)]
        rec = {"name": size.name, "size": H.dataclasses.asdict(size), "B": B, "data": source, "arms": {}}
        live = {}
        log(f"[output layer {size.name}] B={B:,} H={size.H} V={size.V}")
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
                r["gate"] = {"loss": H._rel_err(loss, lr_.detach())}
                r["gate"].update({f"grad.{k}": H._rel_err(g, g_ref) for k, g, g_ref in zip("hWb", grads, gr)})
            except Exception as e:
                r["status"], r["reason"] = "ERROR", f"{type(e).__name__}: {e}".splitlines()[0][:200]
                continue
            ok, bad = H.gate_passes(r["gate"])
            r["status"], r["reason"] = ("PASS", "") if ok else ("FAILED", bad)
            log(f"  {name:12s} {r['status']} {bad}")
            if ok:
                live[name] = fn

        def fwd(fn):
            # Under no_grad: the loss alone (evaluation). With grad enabled, charmlp's
            # scalar-loss forward also computes the gradients (see ops.linear_cross_entropy),
            # so the training cost is the forward+backward column.
            with torch.no_grad():
                return fn(*leaves, y)

        def fwd_bwd(fn):
            return torch.autograd.grad(fn(*leaves, y), leaves)

        plan = [(n, m) for m in ("forward", "fwd_bwd") for n in live]
        run = {"forward": fwd, "fwd_bwd": fwd_bwd}
        t0 = time.perf_counter()
        for _ in range(cfg.warmup_rounds):
            for n, m in plan:
                timer(lambda: run[m](live[n]))
        round_s = (time.perf_counter() - t0) / max(cfg.warmup_rounds, 1)
        reps = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9)))) if plan else 0
        samples = {k: [] for k in plan}
        spare = {k: [] for k in plan}
        cont = H.Contention()
        kept = rep = 0
        while kept < reps and rep < 3 * reps:  # rounds disturbed by other processes are redone
            if rep % 50 == 0:  # a full collection costs ~50 ms with compiled code loaded
                gc.collect()
            gc.disable()
            this = {}
            before = cont.snapshot()
            try:
                for m in ("forward", "fwd_bwd"):
                    names = list(live)
                    k = rep % len(names)
                    for n in names[k:] + names[:k]:
                        this[(n, m)] = timer(lambda: run[m](live[n]))
            finally:
                gc.enable()
            clean = cont.clean(before, cont.snapshot())
            for key, t in this.items():
                (samples if clean else spare)[key].append(t)
            kept += clean
            rep += 1
        if kept < reps:
            for key in samples:
                samples[key].extend(spare[key])
        rec["contention"] = {"kept_rounds": kept, "dropped_rounds": rep - kept, "contended": kept < reps}
        for (n, m), s in samples.items():
            rec["arms"][n]["times"][m] = H.summarize(s)
        if cfg.memory:
            for n, fn in live.items():
                rec["arms"][n]["peak_memory_bytes"] = H.peak_memory(lambda: fwd_bwd(fn), dev)
        rec["repeats"] = reps
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
                row.append(f"{H.fmt_time(t)}" + (f" ({base / t:.2f}x)" if t and base else "") if t else r["status"])
        base = s["arms"]["torch"]["peak_memory_bytes"]
        for a in arms:
            b = s["arms"][a]["peak_memory_bytes"]
            row.append(H.fmt_bytes(b) + (f" ({b / base:.2f}x)" if b is not None and base else "") if b is not None else s["arms"][a]["status"])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv=None):
    args = H.arg_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    if args.sizes is None:
        args.sizes = DEFAULT_SIZES
    cfg, sizes, _ = H.config_from_args(args)
    res = bench_output_layer(sizes, cfg)
    print()
    print("\n".join(output_layer_table(res)))


if __name__ == "__main__":
    main()
