"""Losses over whole splits, and how they are reported (perplexity, bits per character)."""

from __future__ import annotations

import math
import sys

import torch

from ..model import MLPLanguageModel

#: Largest loss whose perplexity exp(loss) is a finite float; a run beyond it diverged.
MAX_LOSS = math.log(sys.float_info.max)


@torch.no_grad()
def evaluate(model: MLPLanguageModel, X: torch.Tensor, Y: torch.Tensor,
             batch_size: int = 65_536) -> float | None:
    """Mean cross-entropy (nats per character) over all of ``X, Y``; None when empty.

    Batched so memory stays bounded; the batch means are combined in float64.
    """
    n = X.shape[0]
    if n == 0:
        return None
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(X[i:i + batch_size], Y[i:i + batch_size], return_logits=False)
        total += float(loss.double()) * min(batch_size, n - i)
    return total / n


def loss_report(loss: float | None, examples: int) -> dict:
    """A loss in nats with its perplexity and bits per character.

    The perplexity of a loss above :data:`MAX_LOSS` (a diverged model) is ``inf``, where
    ``math.exp`` would raise OverflowError; a ``nan`` loss gives ``nan``.
    """
    if loss is None:
        return {"loss": None, "perplexity": None, "bits_per_char": None, "examples": examples}
    perplexity = math.exp(loss) if loss <= MAX_LOSS else (math.inf if loss > MAX_LOSS else math.nan)
    return {"loss": loss, "perplexity": perplexity, "bits_per_char": loss / math.log(2),
            "examples": examples}


def _diverged(loss: float) -> bool:
    """A loss that is not finite, or whose perplexity is not (see :data:`MAX_LOSS`)."""
    return not loss <= MAX_LOSS  # (also true for nan)


def format_losses(reports: dict[str, dict]) -> str:
    lines = [f"  {'split':<6} {'loss':>8} {'perplexity':>11} {'bits/char':>10} {'examples':>10}"]
    for name, r in reports.items():
        if r["loss"] is None:
            lines.append(f"  {name:<6} {'n/a':>8} {'':>11} {'':>10} {r['examples']:>10,}")
        else:
            lines.append(f"  {name:<6} {r['loss']:>8.4f} {r['perplexity']:>11.3f} "
                         f"{r['bits_per_char']:>10.4f} {r['examples']:>10,}")
    return "\n".join(lines)
