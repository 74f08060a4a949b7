"""Sampling new words from a trained model.

The procedure is the lecture notebook's, one word at a time::

    context = [0] * block_size
    while True:
        probs = softmax(model(context))
        ix = torch.multinomial(probs, 1, generator=g).item()
        context = context[1:] + [ix]
        if ix == 0: break

so with temperature 1, no top-k and the notebook's generator
(``torch.Generator().manual_seed(2147483647 + 10)``) the lecture's weights give the lecture's
words. Temperature divides the logits before the softmax (below 1: safer, more common
names; above 1: more adventurous); top-k keeps only the k most likely characters at each
step. The draws come from an explicit CPU generator, so the same seed gives the same words
on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .data import Vocab

__all__ = ["Sample", "sample_words", "format_samples", "DEFAULT_SAMPLE_SEED"]

#: The notebook's sampling generator seed (2147483647 + 10).
DEFAULT_SAMPLE_SEED = 2147483647 + 10
#: A word is cut after this many characters if the model has not ended it.
DEFAULT_MAX_LEN = 64


@dataclass
class Sample:
    word: str
    in_train: bool
    truncated: bool = False  # stopped at max_len before the model emitted '.'


def _check_options(n: int, temperature: float, top_k: int | None, max_len: int) -> None:
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


@torch.no_grad()
def sample_words(model, vocab: Vocab, n: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, top_k: int | None = None, prefix: str = "",
                 train_words: Iterable[str] = (), max_len: int = DEFAULT_MAX_LEN) -> list[Sample]:
    """Draw ``n`` words; each is marked when it occurs in ``train_words``.

    ``prefix`` starts every word with the given characters (they must be in ``vocab``,
    else :class:`~charmlp.data.VocabError`). ``generator`` must be a CPU generator;
    by default the notebook's sampling seed.
    """
    _check_options(n, temperature, top_k, max_len)
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SAMPLE_SEED)
    T = model.block_size
    device = next(model.parameters()).device
    start = vocab.encode(prefix)
    known = set(train_words)
    out: list[Sample] = []
    for _ in range(n):
        ids = list(start)
        context = ([0] * T + ids)[-T:]
        truncated = False
        while True:
            logits, _ = model(torch.tensor([context], dtype=torch.int64, device=device))
            logits = logits.float().cpu()
            if temperature != 1.0:
                logits = logits / temperature
            if top_k is not None and top_k < logits.shape[1]:
                kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=1)
            if not bool(torch.isfinite(probs).all()):
                raise ValueError("the model's outputs are not finite (did training diverge?)")
            ix = int(torch.multinomial(probs, num_samples=1, generator=generator).item())
            context = context[1:] + [ix]
            if ix == 0:
                break
            ids.append(ix)
            if len(ids) >= max_len:
                truncated = True
                break
        word = vocab.decode(ids)
        out.append(Sample(word, word in known, truncated))
    return out


def format_samples(samples: list[Sample]) -> str:
    """One word per line; ``*`` marks words that occur in the training words."""
    lines = []
    for s in samples:
        mark = "*" if s.in_train else " "
        shown = s.word if s.word else "(empty word)"
        if s.truncated:
            shown += "...  (cut at max length)"
        lines.append(f"  {mark} {shown}")
    k = sum(s.in_train for s in samples)
    lines.append(f"  ({k} of {len(samples)} marked * occur in the training words)")
    return "\n".join(lines)
