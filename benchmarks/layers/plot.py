"""layers.png: charmlp's speed-up over PyTorch against V per layer, and LCE's memory ratio."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .targets import (CE_TARGET, ELT_TARGET, LCE_ALL_TARGET, LCE_MEMORY_TARGET, LCE_SMALL_V_TARGET, by_layer,
                      fastest_pytorch, is_contended, lce_memory_ratio, median, speedup)

MARKERS = "osD^vP*Xh<>"


@dataclass
class _Style:
    """What every panel shares: the results, the batch sizes and a color for each."""

    res: dict
    batches: list
    colors: dict

    def shapes(self, layer):
        return list(dict.fromkeys(r["case"]["shape"] for r in by_layer(self.res, layer)))


def _points(ax, st: _Style, layer: str, series, timed: bool) -> tuple[bool, set, bool]:
    """Scatter of every case's value (contended rows faded when ``timed``); cross_entropy's
    points joined per B in V order. Returns (any point, shapes drawn, any faded)."""
    sh = st.shapes(layer)
    any_pt, present, faded = False, set(), False
    for rec in by_layer(st.res, layer):
        c = rec["case"]
        for suffix, fn, filled in series:
            v = fn(rec)
            if v is None:
                continue
            any_pt = True
            present.add(c["shape"])
            busy = timed and is_contended(rec)
            faded |= busy
            mk = MARKERS[sh.index(c["shape"]) % len(MARKERS)] if layer != "ce" else "o"
            col = st.colors[c["B"]]
            ax.scatter([c["dims"]["V"]], [v], marker=mk, s=46, facecolors=col if filled else "none",
                       edgecolors=col, linewidths=1.3, zorder=3, alpha=0.3 if busy else 1.0)
    # cross_entropy: V is the only variable, so each B's points are joined in V order
    # (the other layers' shapes differ in more than V: markers only)
    for B in st.batches if layer == "ce" else []:
        for suffix, fn, filled in series:
            pts = {}
            for rec in by_layer(st.res, layer):
                if rec["case"]["B"] == B and fn(rec) is not None:
                    pts.setdefault(rec["case"]["dims"]["V"], []).append(fn(rec))
            if len(pts) > 1:
                xs = sorted(pts)
                ax.plot(xs, [pts[x][0] for x in xs], color=st.colors[B], lw=0.8,
                        ls="-" if filled else ":", alpha=0.7)
    return any_pt, present, faded


def _legend(ax, st: _Style, layer: str, series, target, present: set, faded: bool, loc: str) -> None:
    """Colors = B, markers = shapes, fill = series."""
    from matplotlib.lines import Line2D

    h = [Line2D([], [], color=st.colors[B], marker="o", ls="", label=f"B={B:,}")
         for B in st.batches if any(r["case"]["B"] == B for r in by_layer(st.res, layer))]
    if layer != "ce":
        h += [Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], ls="", label=s)
              for i, s in enumerate(st.shapes(layer)) if s in present]
    h += [Line2D([], [], color="k", lw=0.8, ls="--", label=tl) for _, tl in target]
    if len(series) > 1:
        h += [Line2D([], [], color="grey", marker="o", ls=("-" if f else ":") if layer == "ce" else "",
                     markerfacecolor="grey" if f else "none", label=s) for s, _, f in series]
    if faded:
        h.append(Line2D([], [], color="grey", marker="o", ls="", alpha=0.3, label="faded: contended, not judged"))
    if h:
        ax.legend(handles=h, fontsize=7, ncol=2, loc=loc)


def _panel(ax, st: _Style, layer, series, title, target, ylabel, loc="best", timed=True) -> bool:
    """series: [(suffix, value fn, filled)]; timed: contended rows are drawn faded"""
    any_pt, present, faded = _points(ax, st, layer, series, timed)
    for tv, tl in target:
        ax.axhline(tv, color="k", lw=0.8, ls="--")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")  # ratios
    ax.set_xlabel("vocabulary V")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, st, layer, series, target, present, faded, loc)
    return any_pt


def _vs_fastest(rec):
    _, ft = fastest_pytorch(rec)
    t = median(rec, "charmlp")
    return ft / t if ft and t else None


def plot(res: dict, path: Path) -> bool:
    """Speed-up (charmlp vs PyTorch) against V, log x, per layer and B; LCE memory ratio vs V."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    batches = sorted({r["case"]["B"] for r in res["cases"]})
    st = _Style(res, batches, {B: plt.cm.viridis(i / max(1, len(batches) - 1) * 0.85) for i, B in enumerate(batches)})
    used = [
        _panel(axes[0, 0], st, "elt", [("fwd+bwd", lambda r: speedup(r, "torch"), True)],
               "embed_linear_tanh forward + backward: PyTorch / charmlp", [(ELT_TARGET, "target 2x")], "speed-up (x, log)"),
        _panel(axes[0, 1], st, "lce", [("vs F.linear + F.cross_entropy", lambda r: speedup(r, "torch"), True),
                                       ("vs fastest PyTorch arm", _vs_fastest, False)],
               "linear_cross_entropy forward + backward",
               [(LCE_SMALL_V_TARGET, "target 1.5x (V <= 1024)"), (LCE_ALL_TARGET, "target 1x vs fastest")],
               "speed-up (x, log)"),
        _panel(axes[1, 0], st, "ce", [("forward (no_grad)", lambda r: speedup(r, "torch", "forward"), False),
                                      ("forward + backward", lambda r: speedup(r, "torch"), True)],
               "cross_entropy: F.cross_entropy / charmlp", [(CE_TARGET, "target 1x")],
               "speed-up (x, log)"),
        _panel(axes[1, 1], st, "lce", [("charmlp / F.linear + F.cross_entropy", lce_memory_ratio, True)],
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
