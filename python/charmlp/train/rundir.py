"""The run directory: its name, creation, lock and files.

One run, one directory, one writer: the process that writes a run directory holds its
:class:`~charmlp.checkpoint.RunLock` from before its first write to its end
(:class:`_Ownership`), so a second ``train`` or ``--resume`` on the same directory fails at
once (:class:`~charmlp.checkpoint.RunDirInUse`) instead of mixing two runs' files. Default
names (``runs/YYYYmmdd-HHMMSS-<random hex>``) are created exclusively, so runs started in
the same second get different directories. Rank 0 writes ``metrics.csv`` (a row per step)
and ``evals.csv`` (:class:`_RunFiles`), ``config.json``, ``split.json``, ``results.json``
and ``samples.txt``; the checkpoint is :mod:`charmlp.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from pathlib import Path

from ..checkpoint import CHECKPOINT_NAME, RunLock, WriteError, atomic_write_text
from .config import ConfigError

METRICS_NAME = "metrics.csv"
EVALS_NAME = "evals.csv"
RESULTS_NAME = "results.json"


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _run_suffix() -> str:
    """Random, not the pid: pids repeat across the machines that may share a runs/ folder."""
    return os.urandom(3).hex()


def _default_run_dir() -> Path:
    return Path("runs") / f"{_timestamp()}-{_run_suffix()}"


def _check_writable_path(out: Path) -> None:
    """A clear error, before any work, for ``--out`` that is, or lies under, a regular file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under {p}, which is a file"
                raise WriteError(f"cannot write {out}: it {what}, not a directory")
            return


def _check_no_run(out: Path, locked: bool = False) -> None:
    if (out / CHECKPOINT_NAME).exists() or (out / RESULTS_NAME).exists():
        if not locked:  # (a run still being written: say so, and by whom)
            RunLock(out).check_free()
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} "
                          f"or choose another --out")


def _new_run_dir(out: str | Path | None) -> tuple[Path, bool]:
    """The run directory to create (not yet created) and whether it is a default name."""
    if out is None:
        return _default_run_dir(), True
    out = Path(out)
    _check_writable_path(out)
    _check_no_run(out)
    return out, False


def _resume_dir(resume: str | Path) -> Path:
    """``--resume``'s run directory; ``RUN/checkpoint.pt`` is taken as ``RUN``.

    Another file is refused: resuming writes next to the checkpoint, and a copied
    checkpoint's directory is not its run's.
    """
    path = Path(resume)
    if path.is_file():
        if path.name != CHECKPOINT_NAME:
            raise ConfigError(f"--resume takes a run directory, and {path} is a file; resume its "
                              f"run with --resume DIR, where DIR holds it as {CHECKPOINT_NAME}")
        return path.parent
    return path


def _create_run_dir(run_dir: Path, default_name: bool, say) -> Path:
    """Create the run directory; a default name is created exclusively and redrawn if taken
    (a run started in the same second by another process), so two runs never share one."""
    if not default_name:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            taken, run_dir = run_dir, _default_run_dir()
            say(f"run directory: {run_dir} ({taken} was taken)")
    raise WriteError(f"cannot create a new run directory in {run_dir.parent}: every name tried exists")


class _Ownership:
    """Rank 0's hold on its run directory during one :func:`train` call: the lock
    (released on exit) and the path, which write errors name."""

    def __init__(self):
        self.run_dir: Path | None = None
        self._stack = contextlib.ExitStack()

    def take(self, run_dir: Path, fresh: bool) -> None:
        """Lock ``run_dir`` until exit. A fresh run checks again, under the lock, that no
        run is there: another process may have written one since the first check, and
        finished, releasing its lock."""
        self.run_dir = run_dir
        self._stack.enter_context(RunLock(run_dir))
        if fresh:
            _check_no_run(run_dir, locked=True)

    def __enter__(self) -> "_Ownership":
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


def _keep_last_good(run_dir: Path, good_step: int | None) -> Path | None:
    """Keep the checkpoint at ``good_step`` as ``checkpoint-step<N>.pt`` before a diverged
    state replaces ``checkpoint.pt`` (a hard link: no copy, and atomic)."""
    src = run_dir / CHECKPOINT_NAME
    if good_step is None or not src.exists():
        return None
    dst = run_dir / f"checkpoint-step{good_step}.pt"
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)
    return dst


def _truncate_csv(path: Path, header: list[str], keep_before: int) -> None:
    """Keep the header and the rows whose step < ``keep_before`` (for resumed runs)."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            for r in reader:
                # A crash can leave a partial last line: keep only complete, parseable rows.
                if len(r) == len(header) and r[0].isdigit() and int(r[0]) < keep_before:
                    rows.append(r)
    lines = [",".join(header)] + [",".join(r) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


class _RunFiles:
    """Rank 0's files in the run directory: per-step metrics and periodic evaluations.

    ``metrics.csv`` has one row per step (``step,lr,loss``: the minibatch loss before the
    update; under DDP, rank 0's minibatch); ``evals.csv`` the full train/dev losses.
    """

    METRICS_HEADER = ["step", "lr", "loss"]
    EVALS_HEADER = ["step", "train", "dev"]

    def __init__(self, run_dir: Path, start_step: int):
        self.dir = run_dir
        _truncate_csv(run_dir / METRICS_NAME, self.METRICS_HEADER, start_step)
        _truncate_csv(run_dir / EVALS_NAME, self.EVALS_HEADER, start_step + 1)
        self.metrics = open(run_dir / METRICS_NAME, "a", newline="")
        self.evals = open(run_dir / EVALS_NAME, "a", newline="")

    def log_steps(self, first_step: int, lrs: list[float], losses: list[float]) -> None:
        self.metrics.write("".join(f"{first_step + i},{lr:.6g},{loss:.6f}\n"
                                   for i, (lr, loss) in enumerate(zip(lrs, losses))))

    def log_eval(self, step: int, train: float | None, dev: float | None) -> None:
        fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
        self.evals.write(f"{step},{fmt(train)},{fmt(dev)}\n")
        self.evals.flush()

    def flush(self) -> None:
        self.metrics.flush()
        self.evals.flush()

    def close(self) -> None:
        self.metrics.close()
        self.evals.close()
