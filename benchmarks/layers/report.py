"""layers.md (header, targets, one table per layer, memory, gate) and layers.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness import fmt_bytes, fmt_time, jsonable

from .arms import GATE_RTOL
from .plot import plot
from .targets import (ELT_TARGET, LCE_ALL_TARGET, LCE_MEMORY_TARGET, LCE_SMALL_V_MAX, LCE_SMALL_V_TARGET, TARGETS,
                      by_layer, evaluate_targets, fastest_pytorch, is_contended, lce_memory_ratio, median, speedup)


def _cell(rec: dict, arm: str, m: str = "fwd_bwd") -> str:
    a = rec["arms"].get(arm)
    if a is None:
        return "-"
    if a["status"] != "PASS":
        return a["status"]
    t = a["times"].get(m) or {}
    if not t.get("n"):
        return "n/a"
    return f"{fmt_time(t['median_s'])} ±{100 * t['iqr_s'] / t['median_s'] / 2:.0f}%"


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


def _flag(rec):
    return " (contended)" if is_contended(rec) else ""


def elt_table(res) -> list[str]:
    L = ["| shape (T, E, H, V) | B | PyTorch | charmlp | speed-up | target >= 2x |", "|---|---|---|---|---|---|"]
    for rec in by_layer(res, "elt"):
        v = speedup(rec, "torch")
        L.append(f"| {rec['label']} | {rec['case']['B']:,}{_flag(rec)} | {_cell(rec, 'torch')} | {_cell(rec, 'charmlp')} "
                 f"| {_x(v)} | {_verdict(v, v is not None and v >= ELT_TARGET, is_contended(rec))} |")
    return L


def lce_table(res) -> list[str]:
    L = ["| shape (H, V) | rows | F.linear + F.cross_entropy | F.linear_cross_entropy | "
         "F.linear_cross_entropy chunked | charmlp | vs F.linear + F.cross_entropy | vs fastest PyTorch arm | target |",
         "|---|---|---|---|---|---|---|---|---|"]
    short = {"torch": "F.linear+CE", "torch-lce": "F.lce", "torch-lce-chunked": "F.lce chunked"}
    for rec in by_layer(res, "lce"):
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
    rows = [r for r in by_layer(res, "lce") if r.get("memory")]
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
                cells.append(fmt_bytes(r["peak_bytes"]))
        grad = next((r["grad_bytes"] for r in mem.values() if "grad_bytes" in r), None)
        v = lce_memory_ratio(rec)
        py = [r["peak_bytes"] for n, r in mem.items() if n != "charmlp" and "peak_bytes" in r]
        ch = (mem.get("charmlp") or {}).get("peak_bytes")
        v2 = ch / min(py) if ch is not None and py and min(py) > 0 else None
        if c["B"] >= mem_rows:
            verdict = _verdict(v, v is not None and v <= LCE_MEMORY_TARGET)
        else:
            verdict = "n/a (few rows: the [V, H] weight gradient dominates every arm)"
        L.append(f"| {rec['label']} | {c['B']:,} | {fmt_bytes(grad)} | " + " | ".join(cells)
                 + f" | {_x(v)} | {_x(v2)} | {verdict} |")
    return L


def ce_table(res) -> list[str]:
    L = ["| V | B | fwd PyTorch | fwd charmlp | fwd speed-up | fwd+bwd PyTorch | fwd+bwd charmlp | fwd+bwd speed-up "
         "| target >= 1x (fwd, fwd+bwd) |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in by_layer(res, "ce"):
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


def _header(res: dict) -> list[str]:
    env = res["environment"]
    cfg = res["config"]
    bi = env["charmlp_build_info"]
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
        f"PyTorch composition (`charmlp.reference`) on the same inputs, max |arm - ref| / max |ref| per tensor <= "
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
    return L


def _targets_section(res: dict, plot_file: str | None) -> list[str]:
    tg = evaluate_targets(res)
    L = ["## Targets", "", "| target | cases met | failing cases (measured) |", "|---|---|---|"]
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
          f"the memory target is judged at >= {res['config']['memory_target_min_rows']:,} rows (with 32 rows the "
          "[V, H] weight gradient, the same in every arm, is most of every arm's memory).", ""]
    if plot_file:
        L += [f"![speed-up and memory ratio vs V]({plot_file})", ""]
    return L


def _lce_section(res: dict) -> list[str]:
    L = ["## linear_cross_entropy: forward + backward", "",
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
              "`harness.memory.rss_probe`). \"gradients\" = the bytes of the gradients of h, W and b that every arm "
              "returns.", ""]
        L += mt + [""]
    return L


def render_markdown(res: dict, plot_file: str | None) -> str:
    L = _header(res) + _targets_section(res, plot_file)
    if by_layer(res, "elt"):
        L += ["## embed_linear_tanh: forward + backward", "",
              "`charmlp.ops.embed_linear_tanh(idx, table, W, b)` vs "
              "`torch.tanh(F.linear(F.embedding(idx, table).flatten(1), W, b))` (`charmlp.reference.module_hidden`).",
              ""]
        L += elt_table(res) + [""]
    if by_layer(res, "lce"):
        L += _lce_section(res)
    if by_layer(res, "ce"):
        L += ["## cross_entropy: forward (under no_grad) and forward + backward", "",
              "`charmlp.ops.cross_entropy(logits, y)` vs `F.cross_entropy(logits, y)`, logits [B, V].", ""]
        L += ce_table(res) + [""]
    L += ["## Correctness gate", ""] + gate_lines(res) + [""]
    warn = sorted({f"{n}: {w}" for r in res["cases"] for n, a in r["arms"].items() for w in a.get("warnings", [])})
    if warn:
        L += ["Warnings raised during the gate: " + "; ".join(warn), ""]
    return "\n".join(L) + "\n"


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
    (outdir / "layers.json").write_text(json.dumps(jsonable(res), indent=1))
    files.update(md=outdir / "layers.md", json=outdir / "layers.json")
    return files
