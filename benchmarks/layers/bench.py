"""One case: gate every arm, then time the passing ones interleaved (:func:`bench_case`); the
LCE peak memory, one fresh process per arm (:func:`lce_memory`, :func:`mem_probe`)."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import time
import warnings

import torch

from harness import BENCH, Block, Config, choose_inner, fmt_bytes, fmt_time, summarize, timed_rounds
from harness.memory import probe_env, proc_status_kib, trim_and_reset_peak

from .arms import ArmSpec, arms_for, fwd, fwd_bwd, gate, gate_passes, reference
from .cases import Case, make_inputs

RUN = {"forward": fwd, "fwd_bwd": fwd_bwd}


def _gate_case(case: Case, specs: list[ArmSpec], inp: dict, rec: dict, log) -> dict:
    """Gates every arm of the case against float64 (recording warnings it raises); returns the
    passing ones, name -> fn."""
    ref = reference(case, inp)
    live: dict[str, object] = {}
    for spec in specs:
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
    return live


def _time_case(case: Case, live: dict, inp: dict, rec: dict, cfg: Config, redo: bool, log) -> int:
    """Warm-up (the gate already ran every arm once: calls of less than 0.5 s run
    ``cfg.warmup_rounds`` more times; the last one sizes the blocks and the rounds), then
    interleaved rounds. Returns the planned number of rounds."""
    plan = [(n, m) for m in case.measurements for n in live]
    blocks = {(n, m): Block("run(fn, inp)", "pass", {"run": RUN[m], "fn": live[n], "inp": inp}, cfg.device)
              for n, m in plan}
    gc.collect()
    first: dict[tuple[str, str], float] = {}
    for k in plan:
        t = blocks[k](1)
        for _ in range(cfg.warmup_rounds if t < 0.5 else 0):
            t = blocks[k](1)
        first[k] = t
    inner = {k: choose_inner(t, cfg.block_s, cap=1000) for k, t in first.items()}
    for (n, m), k in inner.items():
        rec["arms"][n]["inner"][m] = k
    round_s = sum(first[k] * inner[k] for k in first)
    reps = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9))))
    # rounds during which other processes used the CPUs are dropped and redone: up to 3x
    # the planned rounds, and no longer than 2x the planned time (+ the budget) in all
    groups = [[((n, m), lambda k=(n, m): blocks[k](inner[k])) for n in live] for m in case.measurements]
    r = timed_rounds(groups, reps, max_rounds=(3 if redo else 1) * reps, overtime_s=2 * reps * round_s + cfg.budget_s)
    contended = r.kept < min(reps, 3) or r.kept < reps / 2
    # not enough clean rounds: use them all, flag the case when badly short
    for (n, m), s in (r.with_spare() if r.kept < reps else r.samples).items():
        rec["arms"][n]["samples"][m] = s
        rec["arms"][n]["times"][m] = summarize(s)
    rec["contention"] = {"planned_rounds": reps, "kept_rounds": r.kept, "dropped_rounds": r.dropped,
                         "contended": contended, "others_cpu_share": r.others_cpu_share}
    log(f"  {r.kept} clean rounds of {reps} planned (dropped {r.dropped}; round {round_s * 1e3:.1f} ms): "
        + ", ".join(f"{n} {m} {fmt_time(rec['arms'][n]['times'][m]['median_s'])}" for n, m in plan))
    return reps


def bench_case(case: Case, cfg: Config, log=print, arms: list[ArmSpec] | None = None, redo: bool = True) -> dict:
    """Gate, then time every passing arm of one case, interleaved (``redo``: rounds disturbed by
    other processes are redone)."""
    t_case = time.perf_counter()
    inp = make_inputs(case, cfg.seed)
    rec = {"key": case.key, "case": dataclasses.asdict(case), "label": case.label(), "arms": {}}
    log(f"[{case.key}] {case.label()}")
    live = _gate_case(case, arms if arms is not None else arms_for(case.layer), inp, rec, log)
    rec["repeats"] = _time_case(case, live, inp, rec, cfg, redo, log) if live else 0
    rec["elapsed_s"] = time.perf_counter() - t_case
    return rec


def mem_probe(spec: dict) -> dict:
    """Runs in a fresh process (see :func:`lce_memory`): resident-set growth of one forward +
    backward of one arm, above the level just before it. Before the baseline: imports, the
    inputs, and one forward + backward on 32 rows with the same weight (thread pools, lazy
    initialization); the gradients are held until the peak is read (they are the op's output)."""
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
        base = trim_and_reset_peak()
        out = fwd_bwd(fn, inp)
        hwm = proc_status_kib("VmHWM")
        after = proc_status_kib("VmRSS")
    grad_bytes = sum(g.numel() * g.element_size() for g in out[1])
    return {"arm": spec["arm"], "key": case.key, "base_kib": base, "hwm_kib": hwm, "after_kib": after,
            "peak_bytes": (hwm - base) * 1024, "kept_bytes": (after - base) * 1024, "grad_bytes": grad_bytes}


def lce_memory(case: Case, arm_names: list[str], cfg: Config, log=print, parallel: bool = False) -> dict:
    """One fresh process per arm (``bench_layers.py --mem-probe``) runs :func:`mem_probe` (one
    after the other; ``parallel``: all at once, for the smoke test); returns arm -> result (or error)."""
    out = {}
    procs, done = {}, {}

    def finish(name):
        p = procs[name]
        try:
            done[name] = (*p.communicate(timeout=900), p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            done[name] = (*p.communicate(), "timeout")

    for name in arm_names:
        cmd = [sys.executable, str(BENCH / "bench_layers.py"), "--mem-probe",
               json.dumps({"arm": name, "case": dataclasses.asdict(case), "threads": cfg.threads, "seed": cfg.seed})]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=probe_env())
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
    log("  peak memory (RSS growth, fresh process): "
        + ", ".join(f"{n} {fmt_bytes(r.get('peak_bytes'))}" for n, r in out.items()))
    return out
