"""Timing: ``timeit`` blocks, interleaved rounds, contention, medians.

Every timed number in the suite is a *block*: ``number`` back-to-back runs of a statement,
timed by the standard library's ``timeit.Timer`` (the compiled loop that
``torch.utils.benchmark.Timer`` wraps; on a GPU the clock synchronizes the device before
reading the time), reported per call. :func:`timed_rounds`
runs the blocks of several arms in rounds, the order rotating from round to round, drops and
redoes the rounds during which other processes used the CPUs (:class:`Contention`) and
returns the samples, of which the scripts report medians (:func:`summarize`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch


class Block:
    """``stmt`` run ``number`` times back to back after ``setup`` (untimed), as one
    ``timeit.Timer`` measurement; calling it returns seconds per call.

    ``stmt`` is a statement over ``globals`` (``torch`` among them), or a callable (timed as ``fn()``). The timer is
    built once (it compiles the statement: ~70 us) and reused. The thread count is torch's
    current one: the suite sets the process's threads once (``--threads``) and reports them.

    Why not ``torch.utils.benchmark.Timer``: its ``timeit(number)`` first runs
    ``max(number // 100, 2)`` untimed calls of ``stmt`` and sets the thread count around them,
    on every sample. Measured here (2 shared cores; ``torch.mm`` of 128x128 matrices, ~33 us a
    call, 1 thread; medians of 500 interleaved samples): a one-call sample took 126 us of wall
    time through ``timeit`` (3.7x: a large size's rounds, one call each, would fit a third of
    the budget), and 25 calls took 40 us a call against 33 us; a backward sample (``setup`` =
    its forward) would run ``backward`` twice through one graph. Its timed loop without those
    calls is private API (``Timer._timeit``), and is the standard library's ``timeit.Timer``
    underneath, so the harness uses that directly, with the clock torch's Timer uses on each
    device. Its per-call cost is no more than a hand-written ``perf_counter_ns`` loop's: 32.8 us
    (statement) and 32.9 us (``fn()``) against 33.6 us at 25 calls, 34.0 / 33.3 us against
    39.8 us at one call.
    """

    def __init__(self, stmt: str | Callable[[], object], setup: str = "pass", globals: dict | None = None,
                 device: torch.device | str = "cpu"):
        globals = {"torch": torch, **(globals or {})}  # as torch's Timer does
        if callable(stmt):
            stmt, globals = "fn()", {**globals, "fn": stmt}
        clock = _cuda_clock if torch.device(device).type == "cuda" else timeit.default_timer
        self.timer = timeit.Timer(stmt=stmt, setup=setup, timer=clock, globals=globals)

    def __call__(self, number: int = 1) -> float:
        return self.timer.timeit(number) / number


def _cuda_clock() -> float:
    """The time once the GPU has finished the work queued so far (torch's Timer's clock)."""
    torch.cuda.synchronize()
    return timeit.default_timer()


def choose_inner(t_call: float, block_s: float, cap: int = 64) -> int:
    """Calls per timed block: enough back-to-back calls to fill ``block_s`` (1..cap)."""
    if block_s <= 0 or t_call <= 0:
        return 1
    return int(min(cap, max(1, round(block_s / t_call))))


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    n = len(s)
    if n == 0:
        return {"n": 0}
    q = statistics.quantiles(s, n=4, method="inclusive") if n >= 2 else [s[0], s[0], s[0]]
    return {"n": n, "median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "iqr_s": q[2] - q[0],
            "min_s": s[0], "max_s": s[-1]}


class Contention:
    """How much CPU other processes (and the hypervisor: steal time) took during a stretch of
    time, from /proc/stat (all CPUs) minus /proc/self/stat (this process, every thread).

    On a shared machine a round of timings during which something else ran is worthless
    (OpenMP threads that lose their core stall the whole op), so such rounds are discarded
    and redone. Resolution is the kernel tick (USER_HZ, usually 10 ms).
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, max_share: float = 0.05):
        self.max_share = max_share
        self.ncpu = os.cpu_count() or 1
        self.ok = Path("/proc/stat").exists()

    def snapshot(self) -> tuple[int, int, float] | None:
        if not self.ok:
            return None
        try:
            f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
            busy = user + nice + system + irq + softirq + steal
            st = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            mine = int(st[11]) + int(st[12])  # utime + stime (fields 14, 15)
            return busy, mine, time.monotonic()
        except (OSError, ValueError, IndexError):  # pragma: no cover
            self.ok = False
            return None

    def others(self, a, b) -> tuple[int, float]:
        """(ticks used by others, ticks the machine had) between two snapshots."""
        if a is None or b is None:
            return 0, 1
        cap = max(1e-9, (b[2] - a[2]) * self.HZ * self.ncpu)
        return max(0, (b[0] - a[0]) - (b[1] - a[1])), cap

    def clean(self, a, b) -> bool:
        used, cap = self.others(a, b)
        return used <= max(1, self.max_share * cap)


@dataclass
class Rounds:
    """What :func:`timed_rounds` measured: per key, the samples of the clean rounds and of the
    rounds disturbed by other processes (``spare``)."""

    samples: dict
    spare: dict
    kept: int = 0  # clean rounds
    dropped: int = 0  # disturbed rounds
    ran: int = 0  # every round run, warm-up included
    others_cpu_share: float = 0.0  # of the machine, over the whole phase

    def with_spare(self, limit: int | None = None) -> dict:
        """Clean samples plus the disturbed ones (all, or up to ``limit`` samples per key)."""
        return {k: (s + self.spare[k])[:limit] if limit else s + self.spare[k] for k, s in self.samples.items()}


Job = tuple[Hashable, Callable[[], float]]


def timed_rounds(groups: list[list[Job]], rounds: int, *, max_rounds: int | None = None,
                 overtime_s: float | None = None, warmup: int = 0, gc_every: int = 50,
                 before_round: Callable[[int], None] | None = None, contention: bool = True) -> Rounds:
    """Runs every job of every group once per round, each group's jobs in an order rotated by
    the round number (interleaving spreads machine noise over all arms alike), until
    ``rounds`` clean rounds are kept. A job returns seconds per call (a :class:`Block`).

    The first ``warmup`` rounds are not recorded. A round during which other processes used
    more than 5 % of the CPUs is recorded in ``spare`` and redone, up to ``max_rounds``
    rounds in all (default ``3 * rounds``) and, with ``overtime_s``, not longer than that in
    wall time once ``rounds`` have run. Python's GC is off inside a round (a full collection
    every ``gc_every`` rounds). ``before_round(i)`` runs first in each round, untimed.

    ``contention=False``: every round counts (no /proc reads). Reading /proc around a round
    slows the calls right after it, measured here: one-call samples of a 32-us matmul read
    5-10 % slower with the reads than without, of 40-90 us backward passes 10-20 %; blocks of
    ~1 ms (30 calls of that matmul) do not notice. A script timing such short lone calls (and
    that did not drop rounds before) turns it off.
    """
    keys = [k for g in groups for k, _ in g]
    out = Rounds(samples={k: [] for k in keys}, spare={k: [] for k in keys})
    cont = Contention() if contention else None
    limit = warmup + (max_rounds if max_rounds is not None else 3 * rounds)
    snap = cont.snapshot if cont else (lambda: None)
    phase0, t0 = snap(), time.perf_counter()
    gc_was = gc.isenabled()
    while out.kept < rounds and out.ran < limit and (
            overtime_s is None or out.ran < warmup + rounds or time.perf_counter() - t0 < overtime_s):
        rep = out.ran
        if before_round is not None:
            before_round(rep)
        if rep % gc_every == 0:  # a full collection costs ~50 ms with compiled code loaded
            gc.collect()
        gc.disable()
        this = {}
        before = snap()
        try:
            for group in groups:
                k = rep % len(group) if group else 0
                for key, job in group[k:] + group[:k]:
                    this[key] = job()
        finally:
            if gc_was:
                gc.enable()
        clean = cont.clean(before, snap()) if cont else True
        out.ran += 1
        if out.ran <= warmup:
            continue
        for key, t in this.items():
            (out.samples if clean else out.spare)[key].append(t)
        out.kept += clean
        out.dropped += not clean
    if cont:
        others, capacity = cont.others(phase0, snap())
        out.others_cpu_share = others / max(capacity, 1)
    return out
