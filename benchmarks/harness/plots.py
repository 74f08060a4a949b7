"""The suite's plots: time_vs_batch.png (log-log, one configuration) and speedup.png."""

from __future__ import annotations

from pathlib import Path

from .arms import REFERENCE_ARM
from .report import arm_label, arm_map, median, size_label
from .sizes import MEASUREMENT_LABELS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_time_vs_batch(res: dict, outdir: Path) -> str | None:
    """Median time against batch size for one model configuration (the lecture's, else the
    one with most sizes), one line per arm, for the four measurements."""
    fams: dict[str, list] = {}
    for s in res["sizes"]:
        fams.setdefault(s["name"].rsplit("-", 1)[0], []).append(s)
    fam = "lecture" if "lecture" in fams else max(fams, key=lambda f: len(fams[f]), default=None)
    lect = sorted(fams.get(fam, []), key=lambda s: s["B"])
    if not lect:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, m in zip(axes.flat, ("step", "fwd_bwd", "forward", "backward")):
        for a in res["arms"]:
            pts = [(s["B"], median(arm_map(s).get(a), m)) for s in lect]
            pts = [(b, t) for b, t in pts if t]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=arm_label(res, a))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{MEASUREMENT_LABELS[m]}, {size_label(lect[0]).rsplit(' B=', 1)[0]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8)
    env = res["environment"]
    fig.suptitle(f"charmlp vs PyTorch on {env['device']} ({env['cpu_model'] if env['device'] == 'cpu' else env.get('gpu', '')}, "
                 f"{env['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(outdir / "time_vs_batch.png", dpi=110)
    plt.close(fig)
    return "time_vs_batch.png"


def _speedup_panel(ax, res: dict, m: str, ref: str, others: list[str]) -> None:
    n = len(others)
    width = 0.8 / n
    xs = range(len(res["sizes"]))
    for i, a in enumerate(others):
        vals = []
        for s in res["sizes"]:
            am = arm_map(s)
            t, b = median(am.get(a), m), median(am.get(ref), m)
            vals.append(b / t if t and b else 0.0)
        bars = ax.bar([x + (i - (n - 1) / 2) * width for x in xs], vals, width, label=arm_label(res, a))
        for bar, v in zip(bars, vals):
            if v:
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    pos = [v for bars in ax.containers for v in bars.datavalues if v > 0]
    if pos and max(pos) / min(pos) > 20:
        ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([s["name"].replace("lecture-", "L ").replace("large-", "XL ") for s in res["sizes"]],
                       fontsize=8)
    ax.set_ylabel(f"speedup vs {arm_label(res, ref)} (x)")
    ax.set_title(MEASUREMENT_LABELS[m])
    ax.grid(True, axis="y", alpha=0.3)


def plot_speedup(res: dict, outdir: Path) -> str | None:
    """Speedup bars over the reference arm, every size: training step and forward+backward."""
    arms = res["arms"]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    others = [a for a in arms if a != ref]
    if not (others and res["sizes"]):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=False)
    for ax, m in zip(axes, ("step", "fwd_bwd")):
        _speedup_panel(ax, res, m, ref, others)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "speedup.png", dpi=110)
    plt.close(fig)
    return "speedup.png"


def plot_results(res: dict, outdir: Path) -> list[str]:
    """time-vs-batch (log-log, lecture size) and speedup bars; returns the file names."""
    return [f for f in (plot_time_vs_batch(res, outdir), plot_speedup(res, outdir)) if f]
