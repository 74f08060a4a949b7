"""The machine a run measures: what every report's header says (CPU, threads, load,
versions, charmlp's build) and its float32 GEMM peak (the roofline)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import charmlp

from .timing import Block


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def wait_quiet(max_wait_s: float, below: float = 0.5, log: Callable[[str], None] = print) -> bool:
    """Waits until the 1-minute load average drops below ``below`` (at most ``max_wait_s``)."""
    t0 = time.time()
    while True:
        load = loadavg()
        if load is None or load[0] < below:
            return True
        if time.time() - t0 > max_wait_s:
            log(f"machine still busy after {max_wait_s:.0f} s (load {load[0]:.2f}); running anyway")
            return False
        log(f"waiting for a quiet machine (load {load[0]:.2f})")
        time.sleep(15)


def environment(device: torch.device, threads: int) -> dict:
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "charmlp": getattr(charmlp, "__version__", "?"),
        "charmlp_build_info": {k: v for k, v in charmlp.build_info().items() if k != "parallel"},
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CHARMLP_CPU_CAPABILITY",
                                           "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                if k in os.environ},
        "cpu_capability": charmlp.cpu_capability(),
        "loadavg_start": loadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda_runtime"] = torch.version.cuda
    return env


def measure_sgemm_peak(device: torch.device, n: int | None = None, repeats: int = 7) -> dict:
    """float32 GEMM throughput of a large square matmul (median of ``repeats``, after 2 warm-ups)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = torch.empty(n, n, device=device)
    mm = Block("torch.mm(a, b, out=c)", globals={"a": a, "b": b, "c": c}, device=device)
    mm(2)
    ts = [mm(1) for _ in range(repeats)]
    med = statistics.median(ts)
    flops = 2.0 * n**3
    info = {"n": n, "median_s": med, "gflops": flops / med / 1e9, "repeats": repeats,
            "best_gflops": flops / min(ts) / 1e9}
    if device.type == "cuda":
        info["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info
