"""The progress line of ``charmlp train`` on stderr, drawn by tqdm: the step, the mean
minibatch loss since the previous line, the learning rate, steps per second and the ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

#: The line (tqdm's ``bar_format``): tqdm's ``n`` and ``total``, and the fields
#: :class:`Progress` gives it (``percent``: ``100 * n / total``, rounded as always; tqdm's
#: ``percentage``, ``n / total * 100``, can differ in the last digit).
LINE = ("step {n:>{width},}/{total:,} {percent:5.1f}% | loss {loss:.4f} | lr {lr:.3g} | "
        "{steps_per_s:,.0f} steps/s | ETA {eta_hms}")


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Line(tqdm):
    """tqdm showing the numbers it is given (:attr:`fields`, see :data:`LINE`) rather than
    its own rate; on a file or pipe (``in_place=False``) each draw is a line of its own,
    where tqdm would write carriage returns. It draws only when :class:`Progress` asks."""

    monitor_interval = 0  # (no monitor thread: nothing draws between Progress's calls)

    def __init__(self, stream, total: int, start: int, in_place: bool):
        self.in_place = in_place
        self.fields: dict | None = None  # None until the first draw
        super().__init__(total=total, initial=start, file=stream, bar_format=LINE,
                         leave=in_place, dynamic_ncols=in_place)
        if not in_place:
            self.ncols = None  # a log's lines are not cut to a terminal's width

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, **(self.fields or {})}

    def display(self, msg=None, pos=None):
        if self.fields is None:  # (tqdm draws on creation: there is nothing to show yet)
            return False
        if self.in_place:
            return super().display(msg, pos)
        if msg is None:  # (msg="": closing, which erases an in-place line; a log keeps its lines)
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return False


class Progress:
    """The progress line on stderr: step, mean loss, lr, steps/s, ETA (drawn by tqdm).

    Steps/s and the ETA count the training steps' time alone (``train_time``: not the
    evaluations or checkpoints, nor a resumed run's time before ``start``). On a terminal
    the line is redrawn in place (at most 5 times a second); otherwise (logs, CI) a line is
    printed every 10 % of the run or every 30 s. Disabled (``-q``, torchrun ranks > 0) it
    prints nothing. Close it (or use it as a context manager): on a terminal the last line
    then stays, or is erased when the run ended in an exception.
    """

    def __init__(self, total: int, start: int, stream=None, enabled: bool = True,
                 start_time: float = 0.0):
        self.total, self.start = total, start
        self.start_time = start_time  # training time already spent before `start` (resume)
        stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.last = time.perf_counter()
        self.last_step = start
        self.losses: list[float] = []
        self.drawn = False  # (on a terminal: the line is showing)
        self.bar = _Line(stream, total, start, in_place=self.tty) if enabled else None

    def update(self, step: int, losses: list[float], lr: float, train_time: float, force=False) -> None:
        if not self.enabled:
            return
        self.losses.extend(losses)
        now = time.perf_counter()
        if self.tty:
            due = force or now - self.last >= 0.2
        else:
            tenth = max(1, self.total // 10)
            due = force or step // tenth > self.last_step // tenth or now - self.last >= 30
        if not due or not self.losses:
            return
        spent = train_time - self.start_time
        rate = (step - self.start) / spent if spent > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        self.bar.fields = {"width": len(f"{self.total:,}"), "percent": 100 * step / self.total,
                           "loss": sum(self.losses) / len(self.losses), "lr": lr,
                           "steps_per_s": rate, "eta_hms": _hms(eta)}
        self.bar.n = step
        self.bar.refresh()
        self.drawn = self.tty
        self.losses.clear()
        self.last, self.last_step = now, step

    def clear(self) -> None:
        """Take the in-place line off the terminal so that other output can be printed (the
        next update draws it again)."""
        if self.drawn:
            self.bar.clear()
            self.drawn = False

    def close(self, keep: bool = True) -> None:
        """End the line: on a terminal the last line stays (``keep``) or is erased."""
        if self.bar is not None:
            self.bar.leave = self.drawn and keep
            self.bar.close()
            self.bar, self.enabled, self.drawn = None, False, False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self.close(keep=exc_type is None)
        return False
