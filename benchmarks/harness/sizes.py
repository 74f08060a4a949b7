"""The sizes the suite measures, the batches and the starting weights every arm shares."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import charmlp

BENCH = Path(__file__).resolve().parent.parent  # benchmarks/
REPO = BENCH.parent

MEASUREMENTS = ("forward", "backward", "fwd_bwd", "step")
MEASUREMENT_LABELS = {
    "forward": "forward (loss, under no_grad)",
    "backward": "backward",
    "fwd_bwd": "forward + backward",
    "step": "training step",
}
#: FLOPs of each measurement, as a multiple of 2*B*H*(T*E + V) (the two GEMMs of the
#: unfused forward); the training step is 6*B*H*(T*E + V), the issue's roofline count.
FLOP_MULTIPLE = {"forward": 1, "backward": 2, "fwd_bwd": 3, "step": 3}

LR = 0.1

#: the five parameters in charmlp's layout (table [V,E], W1 [H,T*E], b1 [H], W2 [V,H], b2 [V]);
#: the names the gate's errors and results.json use
PARAM_NAMES = ("table", "W1", "b1", "W2", "b2")


@dataclass(frozen=True)
class Size:
    name: str
    T: int  # block size (context length)
    E: int  # embedding width
    H: int  # hidden width
    V: int  # vocabulary
    B: int  # batch rows; 0 = every row of the data set (the full batch)

    @property
    def family(self) -> str:
        return self.name.split("-")[0]

    def flops(self, B: int, measurement: str = "step") -> float:
        return FLOP_MULTIPLE[measurement] * 2.0 * B * self.H * (self.T * self.E + self.V)


FULL_BATCH_ROWS = 228_146  # rows of names.txt at block size 3 (the lecture's full batch)

SIZES: dict[str, Size] = {
    "lecture-32": Size("lecture-32", 3, 10, 200, 27, 32),
    "lecture-256": Size("lecture-256", 3, 10, 200, 27, 256),
    "lecture-4096": Size("lecture-4096", 3, 10, 200, 27, 4096),
    "lecture-32768": Size("lecture-32768", 3, 10, 200, 27, 32768),
    "lecture-full": Size("lecture-full", 3, 10, 200, 27, 0),
    "large-4096": Size("large-4096", 8, 64, 1024, 27, 4096),
    # not in the default run: a tiny model for smoke tests
    "tiny-64": Size("tiny-64", 3, 4, 16, 27, 64),
}
DEFAULT_SIZES = ["lecture-32", "lecture-256", "lecture-4096", "lecture-32768", "lecture-full", "large-4096"]


def parse_size(spec: str) -> Size:
    """A size by name (see ``SIZES``) or ``T:E:H:V:B`` (B=0: the full data set)."""
    spec = spec.strip()
    if spec in SIZES:
        return SIZES[spec]
    parts = spec.split(":")
    if len(parts) == 5 and all(p.isdigit() for p in parts):
        T, E, H, V, B = (int(p) for p in parts)
        if min(T, E, H) < 1 or V < 2 or B < 0:
            raise argparse.ArgumentTypeError(f"bad size {spec!r}")
        return Size(f"custom_T{T}E{E}H{H}V{V}-{B or 'full'}", T, E, H, V, B)
    raise argparse.ArgumentTypeError(
        f"unknown size {spec!r}: use one of {', '.join(SIZES)} or T:E:H:V:B (B=0 for the full batch)"
    )


def find_names_txt() -> Path | None:
    """names.txt of the lecture, if this checkout has it beside it (shared/data/)."""
    env = os.environ.get("CHARMLP_NAMES")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "shared" / "data" / "names.txt", REPO.parent / "shared" / "data" / "names.txt",
                   Path("/work/shared/data/names.txt")]
    for c in candidates:
        if c.is_file():
            return c
    return None


_EXAMPLES_CACHE: dict = {}


def _examples(path: Path, T: int):
    """(X, Y, vocabulary size, path) of a word list at block size T, built once per process."""
    key = (str(path), T)
    if key not in _EXAMPLES_CACHE:
        from charmlp.data import Vocab, build_examples, load_corpus

        corpus = load_corpus(path)
        vocab = Vocab.from_words(corpus.words)
        X, Y = build_examples(corpus.words, vocab, T)
        _EXAMPLES_CACHE[key] = (X, Y, vocab.size, path)
    return _EXAMPLES_CACHE[key]


def make_batch(size: Size, data: str, device: torch.device, seed: int = 1234) -> tuple[Tensor, Tensor, str]:
    """``idx [B, T]`` int64 and ``targets [B]`` for one size; identical for every arm.

    ``data`` is ``"names"`` (rows of names.txt built like the lecture, falling back to
    random when the file is missing or its vocabulary is not V), ``"random"`` (uniform ids)
    or a path to a word list. The full batch (B=0) is every row of the data set; a smaller
    B is drawn with a fixed generator, like the notebook's minibatches.
    """
    g = torch.Generator().manual_seed(seed)
    source = None
    if data != "random":
        path = find_names_txt() if data == "names" else Path(data)
        if path is not None and path.is_file():
            X, Y, vsize, path = _examples(path, size.T)
            if vsize == size.V:
                source = f"{path.name} ({X.shape[0]:,} rows at block {size.T})"
                if size.B == 0:
                    idx, y = X, Y
                else:
                    rows = torch.randint(0, X.shape[0], (size.B,), generator=g)
                    idx, y = X[rows], Y[rows]
    if source is None:
        B = size.B or FULL_BATCH_ROWS
        idx = torch.randint(0, size.V, (B, size.T), generator=g)
        y = torch.randint(0, size.V, (B,), generator=g)
        source = "uniform random ids"
    return idx.contiguous().to(device), y.contiguous().to(device), source


def make_params(size: Size, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """The canonical float32 weights every arm starts from (``nn.Embedding`` / ``nn.Linear``
    initialization), in charmlp's layout: table [V,E], W1 [H,T*E], b1 [H], W2 [V,H], b2 [V]."""
    torch.manual_seed(seed)
    m = charmlp.MLPLanguageModel(size.V, size.T, size.E, size.H, fused=False)
    return {
        "table": m.embed.table.detach().clone().to(device),
        "W1": m.embed.weight.detach().clone().to(device),
        "b1": m.embed.bias.detach().clone().to(device),
        "W2": m.head.weight.detach().clone().to(device),
        "b2": m.head.bias.detach().clone().to(device),
    }
