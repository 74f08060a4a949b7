"""The suite's report: results.md (tables, header, notes) and results.json. The plots are
:mod:`harness.plots`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .arms import REFERENCE_ARM
from .sizes import MEASUREMENT_LABELS


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    if b < 1 << 20:
        return f"{b / 1024:.1f} KiB"
    return f"{b / (1 << 20):.1f} MiB"


def arm_map(size_res: dict) -> dict[str, dict]:
    return {a["name"]: a for a in size_res["arms"]}


def median(arm: dict | None, m: str) -> float | None:
    """The arm's median time of measurement ``m``, if it passed the gate and was timed."""
    if not arm or arm["status"] != "PASS":
        return None
    t = arm["times"].get(m)
    return t.get("median_s") if t and t.get("n") else None


def size_label(s: dict) -> str:
    z = s["size"]
    fam = s["name"].split("-")[0]
    return f"{fam} (T={z['T']},E={z['E']},H={z['H']}) B={s['B']:,}"


def arm_label(res: dict, name: str) -> str:
    for s in res["sizes"]:
        for a in s["arms"]:
            if a["name"] == name:
                return a["label"]
    return name


def _status_cell(arm: dict | None) -> str:
    if arm is None:
        return "-"
    if arm["status"] == "PASS":
        return ""
    return arm["status"]


def _head(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def time_table(res: dict, m: str) -> list[str]:
    arms = res["arms"]
    head = ["size"] + [f"{arm_label(res, a)}" for a in arms]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    extra = []
    if "charmlp" in arms and "compile" in arms:
        extra.append(("charmlp vs compile", "charmlp", "compile"))
    lines = _head(head + [e[0] for e in extra])
    for s in res["sizes"]:
        am = arm_map(s)
        base = median(am.get(ref), m)
        row = [size_label(s)]
        for a in arms:
            t = median(am.get(a), m)
            if t is None:
                st = _status_cell(am.get(a))
                row.append(st if st else "n/a")
                continue
            sp = f" ({base / t:.2f}x)" if base else ""
            iqr = am[a]["times"][m].get("iqr_s", 0.0)
            row.append(f"{fmt_time(t)} ±{100 * iqr / t / 2:.0f}%{sp}")
        for _, num, den in extra:
            tn, td = median(am.get(num), m), median(am.get(den), m)
            row.append(f"{td / tn:.2f}x" if tn and td else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def roofline_table(res: dict) -> list[str]:
    peak = res["sgemm_peak_gflops"]
    arms = res["arms"]
    lines = _head(["size", "step GFLOP", "floor at SGEMM peak"] + [arm_label(res, a) for a in arms])
    for s in res["sizes"]:
        am = arm_map(s)
        fl = s["flops_step"]
        row = [size_label(s), f"{fl / 1e9:.3f}", fmt_time(fl / (peak * 1e9))]
        for a in arms:
            t = median(am.get(a), "step")
            row.append(f"{fl / t / 1e9:.1f} GFLOP/s ({100 * fl / t / 1e9 / peak:.1f}%)" if t
                       else (_status_cell(am.get(a)) or "n/a"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def memory_table(res: dict, key: str = "peak_memory_bytes") -> list[str]:
    arms = res["arms"]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    lines = _head(["size"] + [arm_label(res, a) for a in arms])
    for s in res["sizes"]:
        am = arm_map(s)
        if not any((am.get(a) or {}).get(key) is not None for a in arms):
            continue
        base = (am.get(ref) or {}).get(key)
        row = [size_label(s)]
        for a in arms:
            b = (am.get(a) or {}).get(key)
            if b is None:
                row.append(_status_cell(am.get(a)) or "n/a")
                continue
            row.append(fmt_bytes(b) + (f" ({b / base:.2f}x)" if base else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def gate_table(res: dict) -> list[str]:
    arms = res["arms"]
    lines = _head(["size"] + [arm_label(res, a) for a in arms])
    for s in res["sizes"]:
        am = arm_map(s)
        row = [size_label(s)]
        for a in arms:
            r = am.get(a)
            if r is None:
                row.append("-")
            elif r["status"] in ("PASS", "FAILED"):
                worst = max(r["gate"].values()) if r["gate"] else math.nan
                row.append(f"{r['status']} ({worst:.1e})")
            else:
                row.append(f"{r['status']}: {r['reason'][:60]}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(res: dict) -> list[tuple[str, str, str]]:
    """The performance issue's targets, evaluated on this run: (target, measured, verdict)."""
    out = []
    byname = {s["name"]: arm_map(s) for s in res["sizes"]}

    def ratio(size, num, den, m="step"):
        am = byname.get(size)
        if not am:
            return None
        a, b = median(am.get(num), m), median(am.get(den), m)
        return a / b if a and b else None

    def add(text, value, ok, fmt="{:.2f}x"):
        if value is None:
            out.append((text, "not measured", "-"))
        else:
            out.append((text, fmt.format(value), "met" if ok(value) else "NOT met"))

    if res["environment"]["device"].startswith("cuda"):
        add("B=32 training step >= 10x faster than seed eager", ratio("lecture-32", "seed", "charmlp"), lambda v: v >= 10)
        g = ratio("lecture-32", "seed", "charmlp-graph")
        add("B=32 training step >= 10x (CUDA-graph charmlp)", g, lambda v: v >= 10)
        am = byname.get("lecture-full")
        for arm in ("charmlp", "charmlp-graph"):
            t = median(am.get(arm), "fwd_bwd") if am else None
            add(f"full batch forward+backward <= 0.5 ms ({arm})", t * 1e3 if t else None, lambda v: v <= 0.5, "{:.3f} ms")
        return out
    for size, want in (("lecture-32", 6), ("lecture-4096", 6), ("lecture-full", 10)):
        add(f"{size}: training step >= {want}x faster than seed eager", ratio(size, "seed", "charmlp"), lambda v, w=want: v >= w)
    for s in res["sizes"]:
        if s["name"].startswith("lecture"):
            add(f"{s['name']}: training step faster than torch.compile", ratio(s["name"], "compile", "charmlp"), lambda v: v > 1)
    am = byname.get("lecture-full")
    if am:
        key = "rss_peak_bytes" if (am.get("seed") or {}).get("rss_peak_bytes") else "peak_memory_bytes"
        a = (am.get("charmlp") or {}).get(key)
        b = (am.get("seed") or {}).get(key)
        how = "resident-set growth" if key == "rss_peak_bytes" else "profiler tensor bytes"
        add(f"lecture-full: peak memory of a training step <= 0.25x seed eager ({how})",
            a / b if a is not None and b else None, lambda v: v <= 0.25)
    add("large-4096: training step >= 1.5x faster than seed eager", ratio("large-4096", "seed", "charmlp"), lambda v: v >= 1.5)
    return out


def _ablation_verdict(am: dict) -> list[str]:
    """The 'fastest step' and 'auto picks fastest?' cells of one ablation row."""
    steps = {a: median(am.get(f"charmlp-{a}"), "step") for a in ("direct", "folded")}
    steps = {a: t for a, t in steps.items() if t}
    if len(steps) != 2:
        return ["-", "-"]
    best = min(steps, key=steps.get)
    auto = median(am.get("charmlp-auto"), "step")
    gap = max(steps.values()) / steps[best]
    cells = [f"{best} ({gap:.2f}x)" if gap >= 1.05 else f"tie ({gap:.2f}x)"]
    if not auto:
        cells.append("-")
    elif auto <= 1.05 * steps[best]:
        cells.append(f"yes ({auto / steps[best]:.2f}x of fastest)")
    else:
        cells.append(f"no ({auto / steps[best]:.2f}x of fastest)")
    return cells


def ablation_table(abl: dict) -> list[str]:
    algos = abl["algorithms"]
    lines = _head(["size"] + [f"{m} {a}" for m in ("fwd+bwd", "step") for a in algos]
                  + ["fastest step", "auto picks fastest?"])
    for s in abl["sizes"]:
        am = arm_map(s)
        row = [size_label(s)]
        for m in ("fwd_bwd", "step"):
            for a in algos:
                t = median(am.get(f"charmlp-{a}"), m)
                row.append(fmt_time(t) if t else (_status_cell(am.get(f"charmlp-{a}")) or "-"))
        row += _ablation_verdict(am)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _header(res: dict, command: str | None) -> list[str]:
    env = res["environment"]
    bi = env["charmlp_build_info"]
    L = ["# charmlp benchmark results", ""]
    if command:
        L += [f"Command: `{command}`", ""]
    L += [
        f"- date: {env['date']}; total run time {res.get('total_s', res['elapsed_s']):.0f} s",
        f"- device: `{env['device']}`" + (f" ({env['gpu']}, CUDA {env['cuda_runtime']})" if "gpu" in env else ""),
        f"- CPU: {env['cpu_model']}, {env['cpu_count']} logical CPUs; **torch threads: {env['threads']}** "
        f"(interop {env['interop_threads']})" + (f"; {env['env']}" if env["env"] else ""),
        f"- **charmlp CPU kernels: {env.get('cpu_capability', bi.get('cpu_capability', '?'))}** (of "
        f"{', '.join(bi.get('cpu_capabilities_supported', []))} this CPU runs; `charmlp@X` arms switch to X)",
        f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')} "
        "(anything else running on the machine shows up here and in the timings)",
        f"- torch {env['torch']}, Python {env['python']}",
        f"- charmlp {env['charmlp']} build: " + ", ".join(f"{k}={v}" for k, v in bi.items()),
        f"- SGEMM peak (float32 {res['sgemm_start']['n']}^3 matmul, median): start {res['sgemm_start']['gflops']:.1f}, "
        f"end {res['sgemm_end']['gflops']:.1f} GFLOP/s; roofline uses {res['sgemm_peak_gflops']:.1f} GFLOP/s",
        f"- a timed sample is a block of back-to-back calls of one arm lasting about "
        f"{1e3 * res['config'].get('block_s', 0):.1f} ms (per-call time = block time / calls; a backward is always "
        "timed alone; `--block-ms 0` = one call per sample), so small sizes show the steady state of a training loop "
        "rather than the cost of a lone call after other arms ran; calls per block are in results.json (`inner`)\n"
        f"- each cell: median over the timed rounds ±half the inter-quartile range (% of the median), and "
        f"(speedup vs {REFERENCE_ARM} eager = its median / this median). Arms run interleaved, each round in a "
        f"rotated order, all on the same batch and the same starting weights. Rounds during which other processes "
        f"used more than 5% of the CPUs (/proc/stat) are dropped and redone; clean rounds per size (dropped): "
        + ", ".join(f"{s['name']} {s.get('contention', {}).get('kept_rounds', s['repeats'])}"
                    f" ({s.get('contention', {}).get('dropped_rounds', 0)})" for s in res["sizes"]),
        "- data: " + "; ".join(sorted({s["data"] for s in res["sizes"]})),
        "",
    ]
    return L + _busy_warning(res)


def _busy_warning(res: dict) -> list[str]:
    env = res["environment"]
    busy = [x for x in (env.get("loadavg_start"), env.get("loadavg_end")) if x]
    contended = [s["name"] for s in res["sizes"] if s.get("contention", {}).get("contended")]
    if contended:
        return [f"> **Warning:** too few clean rounds at {', '.join(contended)}: other processes kept using the "
                "CPUs, so those rows include contended rounds and are not trustworthy. Rerun on a quiet machine.", ""]
    if env["device"] == "cpu" and busy and max(b[0] for b in busy) > 0.5 * max(env["threads"], 1) \
            and not any("contention" in s for s in res["sizes"]):
        return [f"> **Warning:** other work was running on this machine during the run (1-minute load average "
                f"{', '.join(str(b[0]) for b in busy)} on {env['cpu_count']} CPUs). CPU timings of multi-threaded "
                "ops degrade badly when their threads share cores with other processes; treat these numbers as noisy "
                "and rerun on a quiet machine (`--wait-quiet`).", ""]
    return []


def _timing_sections(res: dict, plots: list[str] | None) -> list[str]:
    L = []
    tg = targets(res)
    if tg:
        L += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in tg]
        L += [""]
    for m in ("step", "forward", "backward", "fwd_bwd"):
        L += [f"## {MEASUREMENT_LABELS[m].capitalize()}", ""]
        L += time_table(res, m)
        L += [""]
        if m == "step" and plots:
            L += [f"![{p}]({p})" for p in plots] + [""]
    L += ["## Roofline: training step throughput", "",
          f"FLOPs of a training step = 6·B·H·(T·E+V) (the unfused algorithm's two GEMMs, forward and backward); "
          f"% = fraction of the SGEMM peak measured in this run ({res['sgemm_peak_gflops']:.1f} GFLOP/s). "
          "charmlp does less arithmetic than this count (the folded embedding; on CPU its training step also "
          "runs once per distinct context of the batch, with the rows' target counts), so its figure can exceed "
          "the peak: read it as effective throughput.", ""]
    return L + roofline_table(res) + [""]


def _memory_section(res: dict) -> list[str]:
    cuda = res["environment"]["device"].startswith("cuda")
    how = ("`torch.profiler` (profile_memory) peak of live tensor bytes allocated through PyTorch's CPU allocator "
           "during one training step, above what was live before it (the weights, inputs and anything the arm "
           "keeps between steps are not counted; MKL/oneDNN internal workspaces are not seen)"
           if not cuda else
           "`torch.cuda.max_memory_allocated()` during one training step minus `memory_allocated()` before it "
           "(a CUDA-graph arm allocates nothing at replay: its memory lives in the graph's private pool)")
    L = ["## Peak memory of a training step", ""]
    rss_rows = memory_table(res, "rss_peak_bytes")
    if len(rss_rows) > 2:
        L += ["**Resident-set growth** of the arm's first training step at this size, each arm in a fresh process "
              "(baseline just before the step: imports, batch, weights, setup and one 32-row warm-up step done; "
              "compile arms also one step at this size, so compilation is excluded; glibc set to return every "
              "freed block >= 64 KiB to the OS so RSS follows live memory; peak from VmHWM after resetting it via "
              "/proc/self/clear_refs). It counts everything the step needs: activations, gradients, kernels' "
              f"scratch kept between calls, library buffers. Ratio vs {REFERENCE_ARM} eager in brackets.", ""]
        L += rss_rows + [""]
    caveat = ("charmlp's fused kernels keep their scratch in per-thread buffers outside PyTorch's allocator, so this "
              "column understates charmlp; the resident-set table above is the one to quote."
              if not cuda else
              "charmlp's CUDA kernels allocate all scratch through PyTorch's caching allocator, so every arm's "
              "device memory is counted.")
    L += [f"**Tensor allocations** during a warm training step: {how}. Ratio vs {REFERENCE_ARM} eager in brackets. "
          + caveat, ""]
    return L + memory_table(res) + [""]


def _gate_and_arms_sections(res: dict) -> list[str]:
    L = ["## Correctness gate", "",
         "Before timing, each arm's loss and five gradients (forward + backward), and the loss and the update of "
         f"one training step (SGD, lr={res['config']['lr']}; the applied gradient is recovered as "
         "(before - after) / lr), are compared with a float64 evaluation of the seed notebook's code on the same "
         "float32 weights and batch. Error = max |arm - reference| / max |reference| per tensor; limits: "
         + ", ".join(f"{k} {v:.0e}" for k, v in res["gate_rtol"].items())
         + ". A FAILED or ERROR arm is not timed. Cell: status (worst error).", ""]
    L += gate_table(res) + [""]
    L += ["## Arms", ""]
    seen = set()
    for s in res["sizes"]:
        for a in s["arms"]:
            if a["name"] not in seen:
                seen.add(a["name"])
                L.append(f"- **{a['label']}** (`{a['name']}`): {a['description']}")
    L += [""]
    setup = []
    for s in res["sizes"]:
        am = arm_map(s)
        cells = [f"{n} {am[n]['setup_s']:.1f}s" for n in res["arms"] if n in am and am[n]["status"] in ("PASS", "FAILED")]
        setup.append(f"{s['name']}: " + ", ".join(cells))
    return L + ["Setup + gate time per arm (includes torch.compile's compilation): " + "; ".join(setup), ""]


def _extra_sections(res: dict, ablation: dict | None) -> list[str]:
    L = []
    if res.get("output_layer_table"):
        L += ["## Output layer alone: F.linear + F.cross_entropy vs charmlp", "",
              "Op-level (bench_output_layer.py): `torch` = F.cross_entropy(F.linear(h, W2, b2), y); `charmlp-ce` = "
              "charmlp.ops.cross_entropy after F.linear; `charmlp-lce` = charmlp.ops.linear_cross_entropy (logits never "
              "stored). h = the model's hidden states for the batch. Median time (speedup vs torch); fwd = the loss "
              "under torch.no_grad() (with grad enabled charmlp-lce's forward also computes the gradients: the "
              "training cost is fwd+bwd); peak memory of forward + backward (gradients of h, W2, b2).", ""]
        L += res["output_layer_table"] + [""]
    if ablation:
        L += ["## Ablation: charmlp's CPU embedding algorithm", "",
              "`charmlp._C._set_embed_algorithm`: direct = gather rows, GEMM with W1; folded = P_j = table @ W1_j^T "
              "then a gather-sum per row; auto = the C++ cost model's pick. Gated and interleaved like the arms.", ""]
        L += ablation_table(ablation) + [""]
    return L


def render_markdown(res: dict, ablation: dict | None = None, plots: list[str] | None = None,
                    command: str | None = None) -> str:
    L = _header(res, command) + _timing_sections(res, plots) + _memory_section(res) + _gate_and_arms_sections(res)
    return "\n".join(L + _extra_sections(res, ablation)) + "\n"


def jsonable(o):
    """``o`` with non-finite floats as strings and devices as names (``json.dumps``-able)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, torch.device):
        return str(o)
    return o


def write_report(res: dict, outdir: Path, ablation: dict | None = None, plots: bool = True,
                 command: str | None = None) -> dict[str, Path]:
    from .plots import plot_results

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    if plots:
        try:
            files = plot_results(res, outdir)
        except ImportError as e:  # no matplotlib: the tables still get written
            print(f"plots skipped: {e}", file=sys.stderr)
    md = render_markdown(res, ablation, files, command)
    (outdir / "results.md").write_text(md)
    blob = dict(res)
    if ablation:
        blob["ablation"] = ablation
    (outdir / "results.json").write_text(json.dumps(jsonable(blob), indent=1))
    out = {"md": outdir / "results.md", "json": outdir / "results.json"}
    out.update({f: outdir / f for f in files})
    return out
