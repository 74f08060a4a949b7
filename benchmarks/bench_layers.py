#!/usr/bin/env python
"""Question: how fast are charmlp's three drop-in layer ops against the PyTorch code each replaces?

    python benchmarks/bench_layers.py [--layers elt,lce,ce] [--quick] [--out DIR] [--threads N]
                                      [--budget SECONDS] [--repeats N] [--block-ms MS] [--no-memory]

Each layer on the issue's shape grid, op against op on the same float32 inputs:

- ``elt``: ``charmlp.ops.embed_linear_tanh(idx, table, W, b)`` vs
  ``torch.tanh(F.linear(F.embedding(idx, table).view(B, -1), W, b))``; forward + backward
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
  the harness's method: see ``_harness.rss_probe``).
- ``ce``: ``charmlp.ops.cross_entropy(logits, y)`` vs ``F.cross_entropy(logits, y)``: forward alone
  (under ``torch.no_grad()``) and forward + backward (gradient of the logits). B in {32, 4096};
  V in {27, 16383, 32000, 50257}.

Method (the suite's): every arm is first checked against a float64 evaluation of the PyTorch
composition on the same inputs (values and gradients; an arm that fails is reported FAILED and not
timed); then the arms run interleaved in this process, in an order that rotates every round, each
timed sample a block of back-to-back calls of one arm lasting about ``--block-ms`` (one call at
large sizes); rounds during which other processes used the CPUs are dropped and redone (within
limits); medians. Writes ``layers.md``, ``layers.json`` and ``layers.png`` to ``--out``
(default ``benchmarks/results/<device>/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


import _harness as H  # noqa: E402
from charmlp import ops  # noqa: E402

LAYERS = ("elt", "lce", "ce")
LAYER_TITLES = {
    "elt": "embed_linear_tanh",
    "lce": "linear_cross_entropy",
    "ce": "cross_entropy",
}
MEASUREMENT_LABELS = {"forward": "forward (under no_grad)", "fwd_bwd": "forward + backward"}

# --------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------

ELT_SHAPES = {  # name: (T, E, H, V)
    "lecture": (3, 10, 200, 27),
    "wide": (8, 64, 1024, 27),
    "Brown-a": (4, 30, 100, 16383),
    "Brown-b": (4, 60, 50, 16383),
    "AP News": (5, 100, 60, 17964),
}
ELT_BATCHES = (32, 4096, 65536)
LCE_SHAPES = {  # name: (H, V)
    "lecture": (200, 27),
    "wide": (1024, 27),
    "Brown": (100, 16383),
    "32k vocab": (512, 32000),
    "GPT-2 vocab": (1024, 50257),
}
LCE_BATCHES = (32, 4096)
LCE_SEQ = ("sequence [8, 512, 512]", (8, 512), 512, 32000)  # name, leading dims, H, V
CE_VOCABS = (27, 16383, 32000, 50257)
CE_BATCHES = (32, 4096)
MEMORY_MIN_V = 16_000  # LCE peak memory is measured at V >= this

# --smoke (tests): tiny shapes, a couple of rounds
SMOKE = {
    "elt_shapes": {"tiny": (3, 4, 16, 27)}, "elt_batches": (8,),
    "lce_shapes": {"tiny": (16, 27), "tiny-wide-V": (16, 300)}, "lce_batches": (8,),
    "lce_seq": ("sequence [2, 4, 16]", (2, 4), 16, 100),
    "ce_vocabs": (27, 300), "ce_batches": (8,), "memory_min_v": 300,  # memory: tiny-wide-V only
}

# The targets (charmlp vs PyTorch, median time ratio = PyTorch / charmlp; memory = charmlp / PyTorch)
TARGETS = {
    "elt": "embed_linear_tanh forward + backward >= 2x faster than the PyTorch composition",
    "lce_small_v": "linear_cross_entropy >= 1.5x faster than F.linear + F.cross_entropy at V <= 1024",
    "lce_all": "linear_cross_entropy >= 1.0x vs the fastest PyTorch arm, everywhere",
    "lce_memory": "linear_cross_entropy peak memory <= 0.25x of F.linear + F.cross_entropy at V >= 16k",
    "ce": "cross_entropy forward and forward + backward >= 1x vs F.cross_entropy",
}
ELT_TARGET, LCE_SMALL_V_TARGET, LCE_ALL_TARGET, LCE_MEMORY_TARGET, CE_TARGET = 2.0, 1.5, 1.0, 0.25, 1.0
LCE_SMALL_V_MAX = 1024


@dataclass
class Case:
    layer: str  # elt | lce | ce
    shape: str  # the shape's name in the grid
    B: int  # rows (for a [B, T, H] input: B*T)
    dims: dict  # elt: T, E, H, V; lce: H, V (and lead: the leading dims of a 3-D input); ce: V
    measurements: tuple = ("fwd_bwd",)

    @property
    def V(self) -> int:
        return self.dims["V"]

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.shape}/B={self.B}"

    def label(self) -> str:
        d = self.dims
        if self.layer == "elt":
            return f"{self.shape} (T={d['T']},E={d['E']},H={d['H']},V={d['V']:,})"
        if self.layer == "lce":
            return f"{self.shape} (H={d['H']},V={d['V']:,})"
        return f"V={d['V']:,}"


def grid(layers, quick: bool = False, smoke: bool = False) -> list[Case]:
    g = SMOKE if smoke else None
    elt_shapes = g["elt_shapes"] if g else ELT_SHAPES
    elt_b = g["elt_batches"] if g else tuple(b for b in ELT_BATCHES if not (quick and b > 4096))
    lce_shapes = g["lce_shapes"] if g else LCE_SHAPES
    lce_b = g["lce_batches"] if g else LCE_BATCHES
    seq = g["lce_seq"] if g else LCE_SEQ
    ce_v = g["ce_vocabs"] if g else CE_VOCABS
    ce_b = g["ce_batches"] if g else CE_BATCHES
    cases = []
    if "elt" in layers:
        for B in elt_b:
            for name, (T, E, Hd, V) in elt_shapes.items():
                cases.append(Case("elt", name, B, {"T": T, "E": E, "H": Hd, "V": V}))
    if "lce" in layers:
        for B in lce_b:
            for name, (Hd, V) in lce_shapes.items():
                cases.append(Case("lce", name, B, {"H": Hd, "V": V}))
        name, lead, Hd, V = seq
        cases.append(Case("lce", name, math.prod(lead), {"H": Hd, "V": V, "lead": list(lead)}))
    if "ce" in layers:
        for B in ce_b:
            for V in ce_v:
                cases.append(Case("ce", f"V={V}", B, {"V": V}, ("forward", "fwd_bwd")))
    return cases


# --------------------------------------------------------------------------------------
# inputs, arms, reference
# --------------------------------------------------------------------------------------


def _uniform(shape, bound, g):
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def make_inputs(case: Case, seed: int = 1234, rows: int | None = None) -> dict:
    """float32 inputs of one case (``nn.Linear``-like initialization), with ``args`` (what every
    arm is called with), ``leaves`` (the tensors the backward differentiates, requires_grad) and
    ``grad_out`` (the upstream gradient; None for a scalar loss). ``rows``: fewer rows (the
    memory probe's warm-up), from the same generator."""
    g = torch.Generator().manual_seed(seed)
    d = case.dims
    B = rows or case.B
    if case.layer == "elt":
        T, E, Hd, V = d["T"], d["E"], d["H"], d["V"]
        idx = torch.randint(0, V, (B, T), generator=g)
        table = torch.randn(V, E, generator=g)
        W = _uniform((Hd, T * E), (T * E) ** -0.5, g)
        b = _uniform((Hd,), (T * E) ** -0.5, g)
        grad_out = torch.randn(B, Hd, generator=g)
        leaves = [t.requires_grad_() for t in (table, W, b)]
        return {"args": (idx, *leaves), "leaves": leaves, "leaf_names": ("table", "W", "b"), "grad_out": grad_out}
    if case.layer == "lce":
        Hd, V = d["H"], d["V"]
        lead = tuple(d["lead"]) if d.get("lead") else (B,)
        if rows:
            lead = (rows,) if len(lead) == 1 else (1, rows)
        h = torch.tanh(torch.randn(*lead, Hd, generator=g))  # hidden states, as a tanh layer makes them
        W = _uniform((V, Hd), Hd ** -0.5, g)
        b = _uniform((V,), Hd ** -0.5, g)
        y = torch.randint(0, V, lead, generator=g)
        leaves = [t.requires_grad_() for t in (h, W, b)]
        return {"args": (*leaves, y), "leaves": leaves, "leaf_names": ("h", "W", "b"), "grad_out": None}
    V = d["V"]
    logits = (2 * torch.randn(B, V, generator=g)).requires_grad_()
    y = torch.randint(0, V, (B,), generator=g)
    return {"args": (logits, y), "leaves": [logits], "leaf_names": ("logits",), "grad_out": None}


def _flat(h, y):
    """torch's arms on a [B, T, H] input: the flattened rows, as users call F.cross_entropy."""
    return (h.reshape(-1, h.shape[-1]), y.reshape(-1)) if h.dim() > 2 else (h, y)


def torch_elt(idx, table, W, b):
    return torch.tanh(F.linear(F.embedding(idx, table).view(idx.shape[0], -1), W, b))


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
        return [ArmSpec("torch", "PyTorch: tanh(F.linear(F.embedding(idx, table).view(B, -1), W, b))", torch_elt),
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


def reference(case: Case, inp: dict) -> dict:
    """The PyTorch composition in float64 on the same inputs: output and gradients."""
    args = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in inp["args"]]
    leaves = [a for a in args if a.is_floating_point()]
    fn = {"elt": torch_elt, "lce": torch_lce, "ce": torch_ce}[case.layer]
    out = fn(*args)
    go = inp["grad_out"].double() if inp["grad_out"] is not None else None
    grads = torch.autograd.grad(out, leaves, go)
    return {"out": out.detach(), "grads": [g.detach() for g in grads]}


def fwd(fn, inp):
    with torch.no_grad():
        return fn(*inp["args"])


def fwd_bwd(fn, inp):
    out = fn(*inp["args"])
    return out, torch.autograd.grad(out, inp["leaves"], inp["grad_out"])


RUN = {"forward": lambda fn, inp: fwd(fn, inp), "fwd_bwd": lambda fn, inp: fwd_bwd(fn, inp)}

#: relative max error (max |arm - float64| / max |float64| per tensor): the suite's float32 limits
GATE_RTOL = {"value": H.GATE_RTOL["loss"], "grads": H.GATE_RTOL["grads"]}


def gate(case: Case, fn, inp: dict, ref: dict) -> dict[str, float]:
    """The arm's output (loss, or the [B, H] activations) and gradients against float64; for a
    case that times the forward alone, also its output under no_grad (a different code path in
    charmlp's ops)."""
    out, grads = fwd_bwd(fn, inp)
    errs = {"value": H._rel_err(out, ref["out"])}
    for n, g, r in zip(inp["leaf_names"], grads, ref["grads"]):
        errs[f"grad.{n}"] = H._rel_err(g, r)
    if "forward" in case.measurements:
        errs["value.no_grad"] = H._rel_err(fwd(fn, inp), ref["out"])
    return errs


def gate_passes(errs: dict[str, float]) -> tuple[bool, str]:
    bad = []
    for k, e in errs.items():
        lim = GATE_RTOL["value"] if k.startswith("value") else GATE_RTOL["grads"]
        if not e <= lim:
            bad.append(f"{k} rel.err {e:.2e} > {lim:.0e}")
    return (not bad), "; ".join(bad)


# --------------------------------------------------------------------------------------
# timing one case
# --------------------------------------------------------------------------------------


def choose_inner(t_call: float, block_s: float, cap: int = 1000) -> int:
    """Calls per timed block: enough back-to-back calls to fill ``block_s``."""
    if block_s <= 0 or t_call <= 0:
        return 1
    return int(min(cap, max(1, round(block_s / t_call))))


def bench_case(case: Case, cfg: H.Config, log=print, arms: list[ArmSpec] | None = None, redo: bool = True) -> dict:
    """Gate, then time every passing arm of one case, interleaved (``redo``: rounds disturbed by
    other processes are redone)."""
    t_case = time.perf_counter()
    inp = make_inputs(case, cfg.seed)
    ref = reference(case, inp)
    timer = H.Timer(cfg.device)
    rec = {"key": case.key, "case": dataclasses.asdict(case), "label": case.label(), "arms": {}}
    live: dict[str, object] = {}
    first: dict[tuple[str, str], float] = {}
    log(f"[{case.key}] {case.label()}")
    for spec in arms if arms is not None else arms_for(case.layer):
        r = {"label": spec.label, "pytorch": spec.pytorch, "status": "SKIPPED", "reason": spec.reason,
             "gate": {}, "times": {}, "samples": {}, "inner": {}}
        rec["arms"][spec.name] = r
        if spec.fn is None:
            log(f"  {spec.name:18s} SKIPPED ({spec.reason})")
            continue
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                r["gate"] = gate(case, spec.fn, inp, ref)
            r["gate_s"] = time.perf_counter() - t0
            if w:
                r["warnings"] = sorted({str(x.message).splitlines()[0][:200] for x in w})
        except Exception as e:  # an arm that crashes is reported, the rest goes on
            r["status"], r["reason"] = "ERROR", f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log(f"  {spec.name:18s} ERROR {r['reason']}")
            continue
        ok, why = gate_passes(r["gate"])
        r["status"], r["reason"] = ("PASS", "") if ok else ("FAILED", why)
        log(f"  {spec.name:18s} gate {r['status']} (max rel.err {max(r['gate'].values()):.1e}) {why}")
        if ok:
            live[spec.name] = spec.fn
    plan = [(n, m) for m in case.measurements for n in live]
    reps = 0
    if plan:
        gc.collect()
        # warm-up (the gate already ran every arm once): calls of less than 0.5 s run
        # cfg.warmup_rounds more times; the last one sizes the blocks and the rounds
        for (n, m) in plan:
            t = timer(lambda: RUN[m](live[n], inp))
            for _ in range(cfg.warmup_rounds if t < 0.5 else 0):
                t = timer(lambda: RUN[m](live[n], inp))
            first[(n, m)] = t
        inner = {k: choose_inner(t, cfg.block_s) for k, t in first.items()}
        for (n, m), k in inner.items():
            rec["arms"][n]["inner"][m] = k
        round_s = sum(first[k] * inner[k] for k in first)
        reps = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9))))
        samples = {k: [] for k in plan}
        spare = {k: [] for k in plan}
        cont = H.Contention()
        phase0 = cont.snapshot()
        t_phase = time.perf_counter()
        kept = rep = 0
        # rounds during which other processes used the CPUs are dropped and redone: up to 3x
        # the planned rounds, and no longer than 2x the planned time (+ the budget) in all
        while kept < reps and rep < (3 if redo else 1) * reps and (
                rep < reps or time.perf_counter() - t_phase < 2 * reps * round_s + cfg.budget_s):
            if rep % 50 == 0:
                gc.collect()
            gc.disable()
            this = {}
            before = cont.snapshot()
            try:
                for m in case.measurements:
                    names = [n for n in live]
                    k = rep % len(names)
                    for n in names[k:] + names[:k]:  # rotate the order every round
                        fn, cnt = live[n], inner[(n, m)]
                        run = RUN[m]

                        def block():
                            for _ in range(cnt):
                                run(fn, inp)

                        this[(n, m)] = timer(block) / cnt
            finally:
                gc.enable()
            clean = cont.clean(before, cont.snapshot())
            for key, t in this.items():
                (samples if clean else spare)[key].append(t)
            kept += clean
            rep += 1
        others, capacity = cont.others(phase0, cont.snapshot())
        contended = kept < min(reps, 3) or kept < reps / 2
        if kept < reps:  # not enough clean rounds: use them all, flag the case when badly short
            for key in samples:
                samples[key].extend(spare[key])
        for (n, m), s in samples.items():
            rec["arms"][n]["samples"][m] = s
            rec["arms"][n]["times"][m] = H.summarize(s)
        rec["contention"] = {"planned_rounds": reps, "kept_rounds": kept, "dropped_rounds": rep - kept,
                             "contended": contended, "others_cpu_share": others / max(capacity, 1)}
        log(f"  {kept} clean rounds of {reps} planned (dropped {rep - kept}; round {round_s * 1e3:.1f} ms): "
            + ", ".join(f"{n} {m} {H.fmt_time(rec['arms'][n]['times'][m]['median_s'])}" for n, m in plan))
    rec["repeats"] = reps
    rec["elapsed_s"] = time.perf_counter() - t_case
    return rec


# --------------------------------------------------------------------------------------
# peak memory (LCE), one fresh process per arm
# --------------------------------------------------------------------------------------


def mem_probe(spec: dict) -> dict:
    """Runs in a fresh process (see :func:`lce_memory`): resident-set growth of one forward +
    backward of one arm, above the level just before it. Before the baseline: imports, the
    inputs, and one forward + backward on 32 rows with the same weight (thread pools, lazy
    initialization); the gradients are held until the peak is read (they are the op's output)."""
    import ctypes

    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    assert case.layer == "lce", case.layer
    fn = {a.name: a.fn for a in arms_for(case.layer)}[spec["arm"]]
    small = make_inputs(case, spec["seed"], rows=min(32, case.B))
    inp = make_inputs(case, spec["seed"])
    # same weights for the warm-up (not a second [V, H] allocation held alive)
    small["args"] = (small["args"][0], *inp["args"][1:3], small["args"][3])
    small["leaves"] = [small["args"][0], *inp["leaves"][1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd_bwd(fn, small)
        del small
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # pragma: no cover
            pass
        base = H._proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        out = fwd_bwd(fn, inp)
        hwm = H._proc_status_kib("VmHWM")
        after = H._proc_status_kib("VmRSS")
    grad_bytes = sum(g.numel() * g.element_size() for g in out[1])
    return {"arm": spec["arm"], "key": case.key, "base_kib": base, "hwm_kib": hwm, "after_kib": after,
            "peak_bytes": (hwm - base) * 1024, "kept_bytes": (after - base) * 1024, "grad_bytes": grad_bytes}


def lce_memory(case: Case, arm_names: list[str], cfg: H.Config, log=print, parallel: bool = False) -> dict:
    """One fresh process per arm runs :func:`mem_probe` (one after the other; ``parallel``: all at
    once, for the smoke test); returns arm -> result (or error)."""
    out = {}
    env = dict(os.environ, **H.RSS_PROBE_ENV)
    procs, done = {}, {}

    def finish(name):
        p = procs[name]
        try:
            done[name] = (*p.communicate(timeout=900), p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            done[name] = (*p.communicate(), "timeout")

    for name in arm_names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-probe",
               json.dumps({"arm": name, "case": dataclasses.asdict(case), "threads": cfg.threads, "seed": cfg.seed})]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if not parallel:
            finish(name)
    for name in arm_names:
        if name not in done:
            finish(name)
        stdout, stderr, rc = done[name]
        line = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if rc == 0 and line:
            out[name] = json.loads(line[-1])
        else:
            out[name] = {"error": f"exit {rc}: " + (stderr.strip().splitlines() or ["no output"])[-1][:200]}
            log(f"  {name}: memory probe failed: {out[name]['error']}")
    log(f"  peak memory (RSS growth, fresh process): "
        + ", ".join(f"{n} {H.fmt_bytes(r.get('peak_bytes'))}" for n, r in out.items()))
    return out


# --------------------------------------------------------------------------------------
# ratios and targets
# --------------------------------------------------------------------------------------


def median(rec: dict, arm: str, m: str = "fwd_bwd") -> float | None:
    a = rec["arms"].get(arm)
    if not a or a["status"] != "PASS":
        return None
    t = a["times"].get(m)
    return t.get("median_s") if t and t.get("n") else None


def speedup(rec: dict, base: str, m: str = "fwd_bwd") -> float | None:
    """PyTorch arm's median / charmlp's median (> 1: charmlp is faster)."""
    t, b = median(rec, "charmlp", m), median(rec, base, m)
    return b / t if t and b else None


def fastest_pytorch(rec: dict, m: str = "fwd_bwd") -> tuple[str | None, float | None]:
    ts = {n: median(rec, n, m) for n, a in rec["arms"].items() if a["pytorch"]}
    ts = {n: t for n, t in ts.items() if t}
    if not ts:
        return None, None
    n = min(ts, key=ts.get)
    return n, ts[n]


def is_contended(rec: dict) -> bool:
    """Too few clean rounds, or more rounds disturbed by other processes than clean ones (then
    even the clean rounds sat among others' work): the row's timings are not trusted."""
    c = rec.get("contention") or {}
    return bool(c.get("contended")) or c.get("dropped_rounds", 0) > c.get("kept_rounds", 0)


def lce_memory_ratio(rec: dict) -> float | None:
    mem = rec.get("memory") or {}
    a, b = (mem.get("charmlp") or {}).get("peak_bytes"), (mem.get("torch") or {}).get("peak_bytes")
    return a / b if a is not None and b else None


def evaluate_targets(res: dict) -> dict:
    """Each target: the cases it applies to, each with its measured value, pass/fail and whether
    the row's timings were contended (not judged)."""
    out = {k: [] for k in TARGETS}
    mem_min_v = res["config"]["memory_min_v"]
    mem_rows = res["config"]["memory_target_min_rows"]
    for rec in res["cases"]:
        c = rec["case"]
        layer, V = c["layer"], c["dims"]["V"]
        busy = is_contended(rec)
        if layer == "elt":
            v = speedup(rec, "torch")
            out["elt"].append({"key": rec["key"], "value": v, "pass": v is not None and v >= ELT_TARGET,
                               "contended": busy})
        elif layer == "lce":
            if V <= LCE_SMALL_V_MAX:
                v = speedup(rec, "torch")
                out["lce_small_v"].append({"key": rec["key"], "value": v,
                                           "pass": v is not None and v >= LCE_SMALL_V_TARGET, "contended": busy})
            fname, ft = fastest_pytorch(rec)
            t = median(rec, "charmlp")
            v = ft / t if ft and t else None
            out["lce_all"].append({"key": rec["key"], "value": v, "vs": fname,
                                   "pass": v is not None and v >= LCE_ALL_TARGET, "contended": busy})
            if V >= mem_min_v and rec.get("memory") and c["B"] >= mem_rows:
                v = lce_memory_ratio(rec)
                out["lce_memory"].append({"key": rec["key"], "value": v,
                                          "pass": v is not None and v <= LCE_MEMORY_TARGET, "contended": False})
        elif layer == "ce":
            for m in c["measurements"]:
                v = speedup(rec, "torch", m)
                out["ce"].append({"key": f"{rec['key']} {m}", "value": v, "pass": v is not None and v >= CE_TARGET,
                                  "contended": busy})
    return out


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _cell(rec: dict, arm: str, m: str = "fwd_bwd") -> str:
    a = rec["arms"].get(arm)
    if a is None:
        return "-"
    if a["status"] != "PASS":
        return a["status"]
    t = a["times"].get(m) or {}
    if not t.get("n"):
        return "n/a"
    return f"{H.fmt_time(t['median_s'])} ±{100 * t['iqr_s'] / t['median_s'] / 2:.0f}%"


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}x" if abs(v - 1) < 0.01 else f"{v:.2f}x"  # near 1: which side of it


def _verdict(v: float | None, ok: bool, contended: bool = False) -> str:
    if v is None:
        return "-"
    if contended:
        return f"{'pass' if ok else 'fail'} (contended: not judged)"
    return "pass" if ok else "**FAIL**"


def _by_layer(res, layer):
    return [r for r in res["cases"] if r["case"]["layer"] == layer]


def _flag(rec):
    return " (contended)" if is_contended(rec) else ""


def elt_table(res) -> list[str]:
    L = ["| shape (T, E, H, V) | B | PyTorch | charmlp | speed-up | target >= 2x |", "|---|---|---|---|---|---|"]
    for rec in _by_layer(res, "elt"):
        v = speedup(rec, "torch")
        L.append(f"| {rec['label']} | {rec['case']['B']:,}{_flag(rec)} | {_cell(rec, 'torch')} | {_cell(rec, 'charmlp')} "
                 f"| {_x(v)} | {_verdict(v, v is not None and v >= ELT_TARGET, is_contended(rec))} |")
    return L


def lce_table(res) -> list[str]:
    L = ["| shape (H, V) | rows | F.linear + F.cross_entropy | F.linear_cross_entropy | "
         "F.linear_cross_entropy chunked | charmlp | vs F.linear + F.cross_entropy | vs fastest PyTorch arm | target |",
         "|---|---|---|---|---|---|---|---|---|"]
    short = {"torch": "F.linear+CE", "torch-lce": "F.lce", "torch-lce-chunked": "F.lce chunked"}
    for rec in _by_layer(res, "lce"):
        c = rec["case"]
        v1 = speedup(rec, "torch")
        fname, ft = fastest_pytorch(rec)
        t = median(rec, "charmlp")
        v2 = ft / t if ft and t else None
        verdicts = []
        busy = is_contended(rec)
        if c["dims"]["V"] <= LCE_SMALL_V_MAX:
            verdicts.append(f">= 1.5x vs F.linear+CE: {_verdict(v1, v1 is not None and v1 >= LCE_SMALL_V_TARGET, busy)}")
        verdicts.append(f">= 1x vs fastest: {_verdict(v2, v2 is not None and v2 >= LCE_ALL_TARGET, busy)}")
        lead = c["dims"].get("lead")
        rows = f"{c['B']:,}" + (f" ([{', '.join(map(str, lead))}, H])" if lead else "")
        L.append(f"| {rec['label']} | {rows}{_flag(rec)} | {_cell(rec, 'torch')} | {_cell(rec, 'torch-lce')} "
                 f"| {_cell(rec, 'torch-lce-chunked')} | {_cell(rec, 'charmlp')} | {_x(v1)} "
                 f"| {_x(v2)}{f' ({short.get(fname, fname)})' if fname else ''} | {'; '.join(verdicts)} |")
    return L


def memory_table(res) -> list[str]:
    rows = [r for r in _by_layer(res, "lce") if r.get("memory")]
    if not rows:
        return []
    mem_rows = res["config"]["memory_target_min_rows"]
    L = ["| shape (H, V) | rows | gradients (all arms) | F.linear + F.cross_entropy | F.linear_cross_entropy | "
         "F.linear_cross_entropy chunked | charmlp | charmlp / F.linear+CE | charmlp / smallest PyTorch arm | "
         "target <= 0.25x |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in rows:
        mem = rec["memory"]
        c = rec["case"]
        cells = []
        for a in ("torch", "torch-lce", "torch-lce-chunked", "charmlp"):
            r = mem.get(a)
            if r is None:
                cells.append(rec["arms"].get(a, {}).get("status", "-"))
            elif "error" in r:
                cells.append("ERROR")
            else:
                cells.append(H.fmt_bytes(r["peak_bytes"]))
        grad = next((r["grad_bytes"] for r in mem.values() if "grad_bytes" in r), None)
        v = lce_memory_ratio(rec)
        py = [r["peak_bytes"] for n, r in mem.items() if n != "charmlp" and "peak_bytes" in r]
        ch = (mem.get("charmlp") or {}).get("peak_bytes")
        v2 = ch / min(py) if ch is not None and py and min(py) > 0 else None
        if c["B"] >= mem_rows:
            verdict = _verdict(v, v is not None and v <= LCE_MEMORY_TARGET)
        else:
            verdict = "n/a (few rows: the [V, H] weight gradient dominates every arm)"
        L.append(f"| {rec['label']} | {c['B']:,} | {H.fmt_bytes(grad)} | " + " | ".join(cells)
                 + f" | {_x(v)} | {_x(v2)} | {verdict} |")
    return L


def ce_table(res) -> list[str]:
    L = ["| V | B | fwd PyTorch | fwd charmlp | fwd speed-up | fwd+bwd PyTorch | fwd+bwd charmlp | fwd+bwd speed-up "
         "| target >= 1x (fwd, fwd+bwd) |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in _by_layer(res, "ce"):
        vf, vb = speedup(rec, "torch", "forward"), speedup(rec, "torch", "fwd_bwd")
        L.append(f"| {rec['case']['dims']['V']:,} | {rec['case']['B']:,}{_flag(rec)} | {_cell(rec, 'torch', 'forward')} "
                 f"| {_cell(rec, 'charmlp', 'forward')} | {_x(vf)} | {_cell(rec, 'torch')} | {_cell(rec, 'charmlp')} "
                 f"| {_x(vb)} | {_verdict(vf, vf is not None and vf >= 1, is_contended(rec))}, "
                 f"{_verdict(vb, vb is not None and vb >= 1, is_contended(rec))} |")
    return L


def gate_lines(res) -> list[str]:
    L = ["| case | arm: status (worst relative error) |", "|---|---|"]
    for rec in res["cases"]:
        cells = []
        for n, a in rec["arms"].items():
            if a["status"] in ("PASS", "FAILED"):
                cells.append(f"{n}: {a['status']} ({max(a['gate'].values()):.1e})"
                             + (f" {a['reason']}" if a["status"] == "FAILED" else ""))
            else:
                cells.append(f"{n}: {a['status']} {a['reason'][:80]}")
        L.append(f"| {rec['key']} | " + "; ".join(cells) + " |")
    return L


def render_markdown(res: dict, plot: str | None) -> str:
    env = res["environment"]
    cfg = res["config"]
    bi = env["charmlp_build_info"]
    tg = evaluate_targets(res)
    L = ["# charmlp's layer ops vs the PyTorch code they replace", ""]
    if res.get("command"):
        L += [f"Command: `{res['command']}`", ""]
    L += [
        f"- date: {env['date']}; total run time {res['elapsed_s']:.0f} s",
        f"- CPU: {env['cpu_model']}, {env['cpu_count']} logical CPUs; **torch threads: {env['threads']}** "
        f"(interop {env['interop_threads']})" + (f"; {env['env']}" if env["env"] else ""),
        f"- **charmlp CPU kernels: {env.get('cpu_capability', '?')}**",
        f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')} "
        "(a shared machine: other processes' work shows up here and in the timings)",
        f"- torch {env['torch']}, Python {env['python']}; charmlp {env['charmlp']} build: "
        + ", ".join(f"{k}={v}" for k, v in bi.items()),
        f"- cell = median over the timed rounds ±half the inter-quartile range (% of the median); speed-up = the "
        f"PyTorch arm's median / charmlp's (> 1: charmlp faster). Arms run interleaved in one process, the order "
        f"rotating every round; one timed sample is a block of back-to-back calls of one arm lasting about "
        f"{cfg['block_s'] * 1e3:.0f} ms (one call at large sizes; calls per block in layers.json, `inner`); "
        f"{cfg['min_repeats']}..{cfg['max_repeats']} rounds per case, as many as fit {cfg['budget_s']:.0f} s of "
        f"timing; rounds during which other processes used > 5% of the CPUs (/proc/stat) are dropped and redone "
        f"(up to 3x the planned rounds and 2x the planned time; a case left with too few clean rounds uses all "
        f"rounds and is marked *contended*).",
        "- forward + backward = the op's forward and `torch.autograd.grad` of its output with respect to the "
        "float inputs (embed_linear_tanh: table, W, b with one fixed random [B, H] upstream gradient, the same "
        "for both arms; linear_cross_entropy: h, W, b; cross_entropy: the logits). The forward of "
        "cross_entropy is timed under `torch.no_grad()` (the loss alone, as in evaluation; with grad enabled "
        "charmlp's loss ops compute the gradients in their forward, so training cost = forward + backward).",
        "- inputs: float32, `nn.Linear`-like uniform(±1/sqrt(fan_in)) weights and biases, N(0, 1) embedding "
        "table, tanh(N(0, 1)) hidden states, 2·N(0, 1) logits, uniform random indices and targets.",
        f"- correctness gate before timing: every arm's output and gradients vs a float64 evaluation of the "
        f"PyTorch composition on the same inputs, max |arm - ref| / max |ref| per tensor <= "
        f"{GATE_RTOL['value']:.0e} (loss / activations) and <= {GATE_RTOL['grads']:.0e} (gradients); a FAILED or "
        "ERROR arm is not timed (see the gate table at the end).",
        "",
    ]
    contended = [r["key"] for r in res["cases"] if is_contended(r)]
    if contended:
        L += [f"> **Warning:** contended rows (too few clean rounds, or more rounds dropped than kept): "
              f"{', '.join(contended)}. Other processes kept using the CPUs while they ran; their timings are not "
              "trusted (2-thread parallel regions stall for a scheduler time slice when a core is taken) and the "
              "targets table does not judge them.", ""]
    L += ["## Targets", "", "| target | cases met | failing cases (measured) |", "|---|---|---|"]
    for k, text in TARGETS.items():
        rows = tg[k]
        if not rows:
            L.append(f"| {text} | not measured | |")
            continue
        judged = [r for r in rows if not r.get("contended")]
        met = sum(r["pass"] for r in judged)
        bad = [f"{r['key']} ({_x(r['value']) if r['value'] is not None else 'not timed'})" for r in judged if not r["pass"]]
        busy = [f"{r['key']} ({_x(r['value'])}, would {'pass' if r['pass'] else 'fail'})" for r in rows if r.get("contended")]
        L.append(f"| {text} | {'**all** ' if judged and met == len(judged) else ''}{met}/{len(judged)} "
                 f"{'met' if met == len(judged) else '(NOT met)'}"
                 + (f"; {len(busy)} contended, not judged: {', '.join(busy)}" if busy else "")
                 + f" | {', '.join(bad)} |")
    L += ["", "LCE's \"fastest PyTorch arm\" is the fastest of F.linear + F.cross_entropy, F.linear_cross_entropy "
          "(options=None) and F.linear_cross_entropy chunked (options=LinearCrossEntropyOptions()) in that row; "
          f"the memory target is judged at >= {cfg['memory_target_min_rows']:,} rows (with 32 rows the [V, H] weight "
          "gradient, the same in every arm, is most of every arm's memory).", ""]
    if plot:
        L += [f"![speed-up and memory ratio vs V]({plot})", ""]
    if _by_layer(res, "elt"):
        L += ["## embed_linear_tanh: forward + backward", "",
              "`charmlp.ops.embed_linear_tanh(idx, table, W, b)` vs "
              "`torch.tanh(F.linear(F.embedding(idx, table).view(B, -1), W, b))`.", ""]
        L += elt_table(res) + [""]
    if _by_layer(res, "lce"):
        L += ["## linear_cross_entropy: forward + backward", "",
              "`charmlp.ops.linear_cross_entropy(h, W, b, y)` vs `F.cross_entropy(F.linear(h, W, b), y)`, vs torch's "
              "`F.linear_cross_entropy(h, W, y, linear_bias=b)` (its default `options=None` is the reference path: "
              "F.linear then F.cross_entropy) and vs the same with `options=torch.nn.LinearCrossEntropyOptions()` "
              "(torch's chunked path, logits never stored). The sequence row passes h [8, 512, 512] and y [8, 512] "
              "to charmlp as they are; torch's arms get `h.reshape(-1, H)`, `y.reshape(-1)` (torch's op takes only "
              "1-D or 2-D input).", ""]
        L += lce_table(res) + [""]
        mt = memory_table(res)
        if mt:
            L += ["### linear_cross_entropy: peak memory of one forward + backward", "",
                  "Resident-set growth during one forward + backward (the three gradients included, held until the "
                  "peak is read), each arm in a fresh process (`--mem-probe`): imports, the inputs and one "
                  "forward + backward on 32 rows with the same weight happen first; glibc returns every freed block "
                  ">= 64 KiB to the OS (`MALLOC_MMAP_THRESHOLD_=65536`) so the resident set follows live memory; "
                  "peak = VmHWM (reset via /proc/self/clear_refs) - VmRSS before. It counts everything: logits, "
                  "softmax, gradients, kernels' scratch, library buffers (the suite's method, "
                  "`_harness.rss_probe`). \"gradients\" = the bytes of the gradients of h, W and b that every arm "
                  "returns.", ""]
            L += mt + [""]
    if _by_layer(res, "ce"):
        L += ["## cross_entropy: forward (under no_grad) and forward + backward", "",
              "`charmlp.ops.cross_entropy(logits, y)` vs `F.cross_entropy(logits, y)`, logits [B, V].", ""]
        L += ce_table(res) + [""]
    L += ["## Correctness gate", ""] + gate_lines(res) + [""]
    warn = sorted({f"{n}: {w}" for r in res["cases"] for n, a in r["arms"].items() for w in a.get("warnings", [])})
    if warn:
        L += ["Warnings raised during the gate: " + "; ".join(warn), ""]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Speed-up (charmlp vs PyTorch) against V, log x, per layer and B; LCE memory ratio vs V."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    batches = sorted({r["case"]["B"] for r in res["cases"]})
    colors = {B: plt.cm.viridis(i / max(1, len(batches) - 1) * 0.85) for i, B in enumerate(batches)}
    markers = "osD^vP*Xh<>"

    def shapes(layer):
        return list(dict.fromkeys(r["case"]["shape"] for r in _by_layer(res, layer)))

    def panel(ax, layer, series, title, target, ylabel, loc="best", timed=True):
        """series: [(suffix, value fn, filled)]; timed: contended rows are drawn faded"""
        sh = shapes(layer)
        any_pt = False
        present, faded = set(), False
        for rec in _by_layer(res, layer):
            c = rec["case"]
            for suffix, fn, filled in series:
                v = fn(rec)
                if v is None:
                    continue
                any_pt = True
                present.add(c["shape"])
                busy = timed and is_contended(rec)
                faded |= busy
                mk = markers[sh.index(c["shape"]) % len(markers)] if layer != "ce" else "o"
                col = colors[c["B"]]
                ax.scatter([c["dims"]["V"]], [v], marker=mk, s=46, facecolors=col if filled else "none",
                           edgecolors=col, linewidths=1.3, zorder=3, alpha=0.3 if busy else 1.0)
        # cross_entropy: V is the only variable, so each B's points are joined in V order
        # (the other layers' shapes differ in more than V: markers only)
        for B in batches if layer == "ce" else []:
            for suffix, fn, filled in series:
                pts = {}
                for rec in _by_layer(res, layer):
                    if rec["case"]["B"] == B and fn(rec) is not None:
                        pts.setdefault(rec["case"]["dims"]["V"], []).append(fn(rec))
                if len(pts) > 1:
                    xs = sorted(pts)
                    ax.plot(xs, [pts[x][0] for x in xs], color=colors[B], lw=0.8,
                            ls="-" if filled else ":", alpha=0.7)
        for tv, tl in target:
            ax.axhline(tv, color="k", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")  # ratios
        ax.set_xlabel("vocabulary V")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        # legend: colors = B, markers = shapes, fill = series
        from matplotlib.lines import Line2D

        h = [Line2D([], [], color=colors[B], marker="o", ls="", label=f"B={B:,}")
             for B in batches if any(r["case"]["B"] == B for r in _by_layer(res, layer))]
        if layer != "ce":
            h += [Line2D([], [], color="grey", marker=markers[i % len(markers)], ls="", label=s)
                  for i, s in enumerate(sh) if s in present]
        h += [Line2D([], [], color="k", lw=0.8, ls="--", label=tl) for _, tl in target]
        if len(series) > 1:
            h += [Line2D([], [], color="grey", marker="o", ls=("-" if f else ":") if layer == "ce" else "",
                         markerfacecolor="grey" if f else "none", label=s) for s, _, f in series]
        if faded:
            h.append(Line2D([], [], color="grey", marker="o", ls="", alpha=0.3, label="faded: contended, not judged"))
        if h:
            ax.legend(handles=h, fontsize=7, ncol=2, loc=loc)
        return any_pt

    def vs_fastest(rec):
        _, ft = fastest_pytorch(rec)
        t = median(rec, "charmlp")
        return ft / t if ft and t else None

    used = [
        panel(axes[0, 0], "elt", [("fwd+bwd", lambda r: speedup(r, "torch"), True)],
              "embed_linear_tanh forward + backward: PyTorch / charmlp", [(ELT_TARGET, "target 2x")], "speed-up (x, log)"),
        panel(axes[0, 1], "lce", [("vs F.linear + F.cross_entropy", lambda r: speedup(r, "torch"), True),
                                  ("vs fastest PyTorch arm", vs_fastest, False)],
              "linear_cross_entropy forward + backward", [(LCE_SMALL_V_TARGET, "target 1.5x (V <= 1024)"), (LCE_ALL_TARGET, "target 1x vs fastest")],
              "speed-up (x, log)"),
        panel(axes[1, 0], "ce", [("forward (no_grad)", lambda r: speedup(r, "torch", "forward"), False),
                                 ("forward + backward", lambda r: speedup(r, "torch"), True)],
              "cross_entropy: F.cross_entropy / charmlp", [(CE_TARGET, "target 1x")],
              "speed-up (x, log)"),
        panel(axes[1, 1], "lce", [("charmlp / F.linear + F.cross_entropy", lce_memory_ratio, True)],
              "linear_cross_entropy peak memory (RSS growth, fresh process)", [(LCE_MEMORY_TARGET, "target 0.25x")],
              "memory ratio (charmlp / PyTorch)", loc="center right", timed=False),
    ]
    if not any(used):
        plt.close(fig)
        return False
    env = res["environment"]
    fig.suptitle(f"charmlp layer ops vs PyTorch on {env['device']} ({env['cpu_model']}, {env['threads']} torch threads)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, torch.device):
        return str(o)
    return o


def write_report(res: dict, outdir: Path) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    files = {}
    png = outdir / "layers.png"
    try:
        if plot(res, png):
            files["png"] = png
    except ImportError as e:  # no matplotlib: the tables still get written
        print(f"plot skipped: {e}", file=sys.stderr)
    res["targets"] = evaluate_targets(res)
    (outdir / "layers.md").write_text(render_markdown(res, png.name if "png" in files else None))
    (outdir / "layers.json").write_text(json.dumps(_jsonable(res), indent=1))
    files.update(md=outdir / "layers.md", json=outdir / "layers.json")
    return files


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def main(argv=None):
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
    if args.mem_probe:
        print(json.dumps(mem_probe(json.loads(args.mem_probe))))
        return
    if args.render:
        src = Path(args.render)
        res = json.loads(src.read_text())
        files = write_report(res, Path(args.out) if args.out else src.parent)
        print("wrote " + ", ".join(str(f) for f in files.values()))
        return
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    bad = [x for x in layers if x not in LAYERS]
    if bad:
        p.error(f"unknown layer(s) {bad}; use {', '.join(LAYERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    threads = torch.get_num_threads()
    if args.smoke:
        cfg = H.Config(device=dev, threads=threads, quick=True, budget_s=0.05, min_repeats=2, max_repeats=2,
                       warmup_rounds=1, data="random")
    elif args.quick:
        cfg = H.Config(device=dev, threads=threads, quick=True, budget_s=1.0, min_repeats=3, max_repeats=50,
                       warmup_rounds=1, data="random")
    else:
        cfg = H.Config(device=dev, threads=threads, budget_s=5.0, min_repeats=3, max_repeats=200,
                       warmup_rounds=2, data="random")
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.repeats is not None:
        cfg.min_repeats = cfg.max_repeats = args.repeats
    cfg.block_s = args.block_ms / 1e3
    cfg.memory = not args.no_memory
    mem_min_v = SMOKE["memory_min_v"] if args.smoke else MEMORY_MIN_V
    t0 = time.perf_counter()
    res = {"command": ("python benchmarks/bench_layers.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
           "environment": H.environment(dev, threads),
           "config": {"layers": layers, "quick": args.quick, "smoke": args.smoke, "budget_s": cfg.budget_s,
                      "min_repeats": cfg.min_repeats, "max_repeats": cfg.max_repeats,
                      "warmup_rounds": cfg.warmup_rounds, "block_s": cfg.block_s, "seed": cfg.seed,
                      "memory": cfg.memory, "memory_min_v": mem_min_v,
                      "memory_target_min_rows": 8 if args.smoke else 4096,
                      "gate_rtol": GATE_RTOL},
           "targets_text": TARGETS, "cases": []}
    print(f"bench_layers on cpu ({H.cpu_model()}), {threads} torch threads, torch {torch.__version__}", flush=True)
    for case in grid(layers, quick=args.quick, smoke=args.smoke):
        rec = bench_case(case, cfg, log=lambda s: print(s, flush=True), redo=not args.smoke)
        if cfg.memory and case.layer == "lce" and case.V >= mem_min_v:
            names = [n for n, a in rec["arms"].items() if a["status"] == "PASS"
                     and (not args.smoke or n in ("torch", "charmlp"))]  # smoke: two fresh processes
            rec["memory"] = lce_memory(case, names, cfg, log=lambda s: print(s, flush=True), parallel=args.smoke)
        res["cases"].append(rec)
    res["environment"]["loadavg_end"] = H._loadavg()
    res["elapsed_s"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else H.default_outdir(dev)
    files = write_report(res, out)
    print()
    print((out / "layers.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))


if __name__ == "__main__":
    main()
