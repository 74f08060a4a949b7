"""How a training run ends early: interrupted (Ctrl-C/SIGTERM, with a checkpoint), diverged,
or, under torchrun, cut off from another rank."""

from __future__ import annotations

from pathlib import Path


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C/SIGTERM after writing a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"interrupted at step {step:,}; checkpoint written to {run_dir}. "
                         f"Continue with: charmlp train --resume {run_dir}")
        self.step, self.run_dir = step, run_dir


class PeerLost(RuntimeError):
    """Under torchrun: another rank died, stopped, or did not answer within the timeout."""


class TrainingDiverged(FloatingPointError):
    """The loss or the parameters stopped being finite at ``step`` (0-based; ``loss`` is
    its minibatch loss, None when only the parameters or another rank's loss show it).
    The run directory holds the diverged state's checkpoint and results."""

    def __init__(self, step: int, loss: float | None, lr: float, run_dir: Path | None,
                 what: str = "loss", kept: Path | None = None):
        found = f"loss {loss:.4g}" if loss is not None else what
        super().__init__(f"training diverged at step {step:,} ({found}): the learning rate "
                         f"{lr:g} is too high for this model; lower --lr"
                         + (f" (the last good checkpoint is kept as {kept})" if kept else ""))
        self.step, self.loss, self.lr, self.run_dir, self.kept = step, loss, lr, run_dir, kept
