"""The run's data: the corpus, its vocabulary and word split, the example tensors, and
the minibatches each step trains on.

Minibatch indices are drawn for a chunk of steps at once from a generator seeded from
``(seed, rank)`` (:func:`batch_seed`): ``torch.randint(0, n, (k, batch))`` gives exactly the
numbers of ``k`` successive ``torch.randint(0, n, (batch,))`` calls, so chunking never
changes which rows a run sees, and nothing depends on global RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import Corpus, Split, Vocab, build_examples, load_corpus, split_words
from .config import ConfigError, TrainConfig


@dataclass
class _Data:
    """The corpus's description (as saved in checkpoints), its vocabulary and word split,
    and each split's ``(X, Y)`` example tensors (on the CPU)."""

    corpus: dict
    vocab: Vocab
    split: Split
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _load_split(cfg: TrainConfig, log) -> tuple[Corpus, Vocab, Split]:
    """cfg.data's corpus, its vocabulary and the train/dev/test split of its words."""
    corpus = load_corpus(cfg.data, cfg.lowercase, warn=log)
    log(f"corpus: {corpus.describe()}")
    vocab = Vocab.from_words(corpus.words)
    try:
        split = split_words(corpus.words, cfg.split_seed, cfg.test_count, cfg.dev_count)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return corpus, vocab, split


def _prepare_data(cfg: TrainConfig, ckpt: dict | None, log) -> _Data:
    """The run's data: a resumed run's vocabulary and split from its checkpoint ``ckpt``
    (the corpus is not read again), a new run's from ``cfg.data``."""
    if ckpt is not None:
        corpus_info = ckpt["corpus"]
        vocab = Vocab.from_dict(ckpt["vocab"])
        split = Split.from_dict(ckpt["split"])
        log(f"corpus: {corpus_info.get('path') or corpus_info.get('name')}: "
            f"{corpus_info.get('num_words', 0):,} words (from the checkpoint)")
    else:
        corpus, vocab, split = _load_split(cfg, log)
        corpus_info = corpus.to_dict()
    tensors = {name: build_examples(words, vocab, cfg.block_size, source=name)
               for name, words in split.parts().items()}
    if tensors["train"][0].shape[0] == 0:
        raise ConfigError("the training split is empty: the corpus is too small for this split")
    log(f"vocabulary: {vocab.size} symbols {''.join(vocab.itos)!r}")
    log(f"{split.describe()}; examples: "
        + " / ".join(f"{t[0].shape[0]:,}" for t in tensors.values()))
    return _Data(corpus_info, vocab, split, tensors)


def batch_seed(seed: int, rank: int) -> int:
    """Seed of a rank's minibatch generator: independent streams for each (seed, rank)."""
    state = np.random.SeedSequence([int(seed), 0x6D62, int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def draw_batches(generator: torch.Generator, n: int, steps: int, batch_size: int) -> torch.Tensor:
    """Minibatch row indices for ``steps`` steps, ``[steps, batch_size]``, like the notebook.

    One call equals ``steps`` successive ``torch.randint(0, n, (batch_size,))`` draws from
    the same generator (tested), so chunking never changes which rows a run sees.
    """
    return torch.randint(0, n, (steps, batch_size), generator=generator)
