"""The issue's targets for the layer ops and the ratios they are judged on."""

from __future__ import annotations

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


def by_layer(res, layer):
    return [r for r in res["cases"] if r["case"]["layer"] == layer]


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
