"""PNG plots of a run: loss curve, embedding table, learning-rate sweep.

matplotlib is used with the Agg backend (files only, no display needed), imported lazily
so that training never pays for it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

__all__ = ["PlotError", "plot_loss_curve", "plot_embedding", "plot_lr_find", "embedding_2d"]


class PlotError(ValueError):
    """A run file that holds nothing to plot (empty, header only) or is not a metrics table."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _read_csv(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The columns of a run's CSV file as float arrays (a missing value: nan).

    A file without the ``required`` columns (empty, or not one of charmlp's) is a
    :class:`PlotError`. A crash can leave a partial last row, which is skipped, as a
    resumed run does.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        cols = reader.fieldnames or []
    missing = [c for c in required if c not in cols]
    if missing:
        raise PlotError(f"{path}: " + ("is empty" if not cols else
                                       f"has no {', '.join(missing)} column (not a charmlp run file?)"))

    def number(text):
        return np.nan if text in ("", None) else float(text)

    out = {c: [] for c in cols}
    for i, r in enumerate(rows):
        try:
            values = {c: number(r[c]) for c in cols}
        except ValueError:
            if i == len(rows) - 1:
                break
            raise PlotError(f"{path}: row {i + 2} is not numbers: {','.join(map(str, r.values()))!r}") from None
        for c in cols:
            out[c].append(values[c])
    return {c: np.array(v, dtype=np.float64) for c, v in out.items()}


def plot_loss_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """log10 of the minibatch loss per step, as in the lecture, plus its running mean
    over 1,000 steps and the train/dev losses of the periodic evaluations."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a charmlp run directory?)")
    m = _read_csv(metrics, ("step", "loss"))
    if len(m["step"]) == 0:
        raise PlotError(f"{metrics}: no steps logged yet, nothing to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    step, loss = m["step"], m["loss"]
    ax.plot(step, np.log10(loss), lw=0.3, alpha=0.5, color="tab:blue", label="minibatch loss")
    w = min(1000, max(1, len(loss) // 20))
    if len(loss) >= w > 1:
        mean = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(step[w - 1:], np.log10(mean), color="tab:blue", lw=1.5,
                label=f"mean over {w:,} steps")
    evals = run_dir / "evals.csv"
    if evals.exists():
        try:
            e = _read_csv(evals, ("step", "train", "dev"))
        except PlotError:  # (the evaluations are an overlay: the loss curve stands alone)
            e = {"step": []}
        if len(e["step"]):
            ax.plot(e["step"], np.log10(e["train"]), "o-", color="tab:orange", ms=3, label="train (full)")
            if np.isfinite(e["dev"]).any():
                ax.plot(e["step"], np.log10(e["dev"]), "s-", color="tab:green", ms=3, label="dev (full)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 loss (nats)")
    ax.set_title(f"charmlp training loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def embedding_2d(table: torch.Tensor) -> tuple[np.ndarray, str]:
    """2-D coordinates of the embedding rows: the table itself when it is 2-wide, else its
    first two principal components (SVD of the centered table)."""
    t = table.detach().double().cpu()
    if t.shape[1] == 2:
        return t.numpy(), "embedding dimensions"
    if t.shape[1] == 1:
        return torch.cat([t, torch.zeros_like(t)], 1).numpy(), "embedding dimension (1-D)"
    centered = t - t.mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(centered, full_matrices=False)
    explained = (s[:2] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300)
    return (centered @ vt[:2].T).numpy(), f"first two principal components ({100 * explained:.0f}% of variance)"


def plot_embedding(table: torch.Tensor, itos: list[str], out: str | Path, title: str = "") -> Path:
    """Scatter of the characters' embeddings with their labels, like the lecture's figure."""
    xy, how = embedding_2d(table)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.scatter(xy[:, 0], xy[:, 1], s=200)
    for i, ch in enumerate(itos):
        ax.text(xy[i, 0], xy[i, 1], ch, ha="center", va="center", color="white", fontsize=9)
    ax.set_title(f"{title}\n{how}" if title else f"character embeddings: {how}")
    ax.set_xlabel("component 1" if "principal" in how else "dim 0")
    ax.set_ylabel("component 2" if "principal" in how else "dim 1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_lr_find(sweep: dict, out: str | Path) -> Path:
    """Minibatch loss against log10 learning rate (the lecture's ``plt.plot(lri, lossi)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    lre = np.array(sweep["lre"])
    ax.plot(lre, sweep["losses"], lw=0.6, alpha=0.6, label="minibatch loss")
    ax.plot(lre, sweep["smoothed"], lw=1.5, label="smoothed")
    ax.axvline(np.log10(sweep["suggested_lr"]), color="tab:green", ls="--",
               label=f"suggested lr {sweep['suggested_lr']:.3g}")
    finite = np.array([x for x in sweep["losses"] if np.isfinite(x)])
    if finite.size:
        ax.set_ylim(finite.min() * 0.95, min(finite.max(), np.percentile(finite, 99) * 1.2))
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("loss (nats)")
    ax.set_title("learning-rate sweep: one SGD step per rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
