"""``charmlp lr-find``: the lecture's learning-rate sweep."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data import build_examples
from .config import ConfigError, TrainConfig
from .dataset import _load_split, batch_seed, draw_batches
from .state import _build_model, _check_device


def lr_find(cfg: TrainConfig, lre_min: float = -3.0, lre_max: float = 0.0, num: int = 1000,
            log: Callable[[str], None] = print) -> dict:
    """The lecture's learning-rate sweep: one SGD step at each of ``10 ** linspace(min, max, num)``.

    Returns the exponents, the minibatch losses (and their running mean over ~5 % of the
    sweep) and the suggested rate: the left edge of the valley, i.e. the lowest rate whose
    smoothed loss is within 10 % of the smoothed minimum. That is the lecture's reasoning
    ("the loss stops improving around here"): the minimum itself sits where a single step
    is already close to too large, and a whole run at that rate is less stable. On
    names.txt it gives about 0.1, the lecture's choice.
    """
    cfg = cfg.resolved()
    if num < 2:
        raise ConfigError(f"the sweep needs at least 2 rates, got {num}")
    if not lre_min < lre_max:
        raise ConfigError(f"lr exponent range must be increasing, got {lre_min}..{lre_max}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _check_device(cfg)
    device = torch.device(cfg.device)
    _, vocab, split = _load_split(cfg, log)
    X, Y = (t.to(device) for t in build_examples(split.train, vocab, cfg.block_size))
    model = _build_model(cfg, vocab.size, device)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, 0))
    lre = torch.linspace(lre_min, lre_max, num)
    lrs = (10 ** lre).tolist()
    ix = draw_batches(gen, X.shape[0], num, cfg.batch_size).to(device)
    losses = model.sgd_steps(X[ix], Y[ix], lrs).tolist()  # one SGD step per rate, one call
    arr = np.array(losses, dtype=np.float64)
    arr = np.where(np.isfinite(arr), arr, np.inf)
    w = max(1, num // 20)
    padded = np.concatenate([np.full(w // 2, arr[0]), arr, np.full(w - 1 - w // 2, arr[-1])])
    smooth = np.convolve(padded, np.ones(w) / w, mode="valid")
    best = int(np.argmin(smooth))
    edge = int(np.flatnonzero(smooth[:best + 1] <= smooth[best] * 1.1)[0])
    suggested = 10 ** float(lre[edge])
    log(f"lowest smoothed loss {smooth[best]:.4f} at lr {10 ** float(lre[best]):.3g} "
        f"(10^{float(lre[best]):.2f}); the valley starts at 10^{float(lre[edge]):.2f}: "
        f"suggested lr {suggested:.2g}")
    return {"lre": lre.tolist(), "losses": losses, "smoothed": smooth.tolist(),
            "best_lr": 10 ** float(lre[best]), "suggested_lr": suggested}
