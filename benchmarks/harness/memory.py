"""Peak memory of a training step: tensor allocations in-process (``torch.profiler``, CUDA's
allocator statistics) and resident-set growth in a fresh process (:func:`rss_memory`)."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from .arms import ARMS, CompileArm
from .sizes import BENCH, LR, Size, make_batch, make_params


class quiet_stderr:
    """Silences file descriptor 2 (Kineto prints two lines per profiler session there)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:  # pragma: no cover
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def _walk(nodes, out):
    for n in nodes:
        out.append(n)
        _walk(n.children, out)
    return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by ``fn()`` above what was live before it.

    CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
    through PyTorch's CPU allocator (the calling thread's: every tensor an eager op, an
    Inductor kernel or a charmlp kernel allocates with ``at::empty``); the peak is the
    maximum of the running sum in time order. It does not see memory that libraries
    allocate outside PyTorch's allocator (MKL/oneDNN workspaces, ``std::vector`` scratch).
    CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [n for n in _walk(prof.profiler.kineto_results.experimental_event_tree(), [])
              if n.tag == _EventType.Allocation]
    allocs.sort(key=lambda n: n.start_time_ns)
    cur = peak = 0
    for n in allocs:
        cur += n.extra_fields.alloc_size
        peak = max(peak, cur)
    return int(peak)


def proc_status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover
        pass
    return None


def trim_and_reset_peak() -> int | None:
    """Frees what can be freed (GC, ``malloc_trim``), resets ``VmHWM`` to ``VmRSS`` through
    ``/proc/self/clear_refs`` and returns ``VmRSS`` (KiB): the baseline of an RSS probe."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass
    base = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return base


#: environment of an RSS probe: glibc hands every block of 64 KiB or more straight back to
#: the OS when it is freed (a fixed mmap threshold also turns off glibc's adaptive one), so
#: the resident set follows the memory that is actually live.
RSS_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def probe_env() -> dict[str, str]:
    """The environment of a fresh probe process: ``RSS_PROBE_ENV`` and ``benchmarks/`` on the path."""
    path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, **RSS_PROBE_ENV, PYTHONPATH=path)


def rss_probe(arm_name: str, size: Size, data: str, threads: int, lr: float = LR, seed: int = 1234) -> dict:
    """Runs in a fresh process (see :func:`rss_memory`): the growth of the resident set
    during the arm's first training step at this size, above the level just before it.

    Before the baseline: imports, the batch, the weights, the arm's setup, and one training
    step on a 32-row batch (thread pools, MKL and kernels' lazy initialization); arms that
    compile per shape also run one step at this size first (compilation is not a step's
    memory). So the number counts everything the step needs that was not there before:
    activations, gradients, workspaces that kernels keep between calls (charmlp's per-thread
    scratch) and library buffers, whichever allocator they come from.
    """
    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    idx, y, _ = make_batch(size, data, dev, seed)
    small = dataclasses.replace(size, B=min(32, idx.shape[0]))
    sidx, sy, _ = make_batch(small, data, dev, seed + 1)
    params = make_params(size, dev)
    arm = ARMS[arm_name]()
    arm.setup(params, size, idx, y, lr)
    if isinstance(arm, CompileArm):
        arm.train_step(idx, y)
    else:
        arm.train_step(sidx, sy)
    arm.load(params)
    base = trim_and_reset_peak()
    arm.train_step(idx, y)
    hwm = proc_status_kib("VmHWM")
    after = proc_status_kib("VmRSS")
    return {"arm": arm_name, "size": size.name, "B": int(idx.shape[0]), "base_kib": base, "hwm_kib": hwm,
            "after_kib": after, "peak_bytes": (hwm - base) * 1024, "kept_bytes": (after - base) * 1024}


def rss_memory(arm_names: list[str], size: Size, cfg, log: Callable[[str], None] = print) -> dict:
    """One fresh process per arm (``python -m harness --rss-probe``) runs :func:`rss_probe`;
    returns arm -> result (or error). ``cfg``: a :class:`harness.suite.Config`."""
    out = {}
    for name in arm_names:
        cmd = [sys.executable, "-m", "harness", "--rss-probe",
               json.dumps({"arm": name, "size": dataclasses.asdict(size), "data": cfg.data,
                           "threads": cfg.threads, "lr": cfg.lr, "seed": cfg.seed})]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=probe_env(), timeout=600)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not line:
                raise RuntimeError((p.stderr.strip().splitlines() or ["no output"])[-1][:200])
            out[name] = json.loads(line[-1])
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {name}: RSS probe failed: {out[name]['error']}")
    return out
