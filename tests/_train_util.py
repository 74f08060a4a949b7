"""Shared helpers for the data/training/CLI tests (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

#: The lecture's names.txt, read from ../shared next to the repository, never copied into it.
NAMES_TXT = Path(__file__).resolve().parents[1].parent / "shared/data/names.txt"


def notebook_examples(words, stoi, block_size):
    """The lecture notebook's build_dataset loop, verbatim (the reference for build_examples)."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return X, Y


def write_words(path: Path, words) -> Path:
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


def small_config(**kw):
    """A small, fast training configuration on the embedded corpus (seconds on 2 cores)."""
    from charmlp.train import TrainConfig

    base = dict(steps=300, hidden=64, init="default", eval_every=0, checkpoint_every=100, num_samples=3,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def params_of(run_dir):
    """The final parameters stored in a run's checkpoint."""
    from charmlp.checkpoint import load_checkpoint

    return load_checkpoint(run_dir)["model"]["state_dict"]
