"""The suite: at each size, gate every arm, time the passing ones interleaved, measure their
memory (:func:`bench_size`); over all sizes, with the machine's SGEMM peak (:func:`run_suite`)."""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .arms import ARMS, DEFAULT_ARMS, REFERENCE_ARM, Arm, CharmlpAlgorithmArm
from .gate import GATE_RTOL, check_arm, gate_passes, reference
from .machine import cpu_model, environment, loadavg, measure_sgemm_peak
from .memory import peak_memory, rss_memory
from .report import fmt_bytes
from .sizes import LR, MEASUREMENTS, Size, make_batch, make_params
from .timing import Block, choose_inner, summarize, timed_rounds


@dataclass
class Config:
    device: torch.device
    threads: int
    quick: bool = False
    budget_s: float = 20.0  # timed seconds per size (after warm-up)
    min_repeats: int = 5
    max_repeats: int = 300
    warmup_rounds: int = 2
    #: a timed sample is a block of back-to-back calls filling about this long (0: one call)
    block_s: float = 1e-3
    data: str = "names"
    memory: bool = True
    #: sizes whose step memory is also measured as resident-set growth in fresh processes
    rss_sizes: tuple = ("lecture-4096", "lecture-full", "large-4096")
    lr: float = LR
    seed: int = 1234

    @classmethod
    def quick_config(cls, device, threads, **kw):
        return cls(device=device, threads=threads, quick=True, budget_s=0.5, min_repeats=2, max_repeats=3,
                   warmup_rounds=1, **kw)


@dataclass
class ArmResult:
    name: str
    label: str
    description: str
    status: str = "PENDING"  # PASS | FAILED | ERROR | SKIPPED
    reason: str = ""
    gate: dict = field(default_factory=dict)
    setup_s: float = 0.0  # setup + gate (includes torch.compile's compilation)
    times: dict = field(default_factory=dict)  # measurement -> summary (samples in seconds)
    samples: dict = field(default_factory=dict)
    inner: dict = field(default_factory=dict)  # measurement -> back-to-back calls per timed block
    peak_memory_bytes: int | None = None  # torch.profiler: tensor bytes allocated during a step
    rss_peak_bytes: int | None = None  # fresh process: resident-set growth of the first step
    rss: dict = field(default_factory=dict)


def measurement(arm: Arm, what: str, idx: Tensor, y: Tensor, device: torch.device) -> Callable[[int], float]:
    """A timed sample of ``what`` for one arm: ``sample(inner)`` -> seconds per call over a
    block of ``inner`` back-to-back calls. Untimed preparation (zeroing gradients, the
    forward that a backward needs) is the block's ``setup``; a backward is always timed
    alone (one call), and in a forward+backward block each call zeroes the gradients first."""
    g = {"arm": arm, "idx": idx, "y": y}
    if what == "forward":
        # The loss alone, as in evaluation: under no_grad no arm records a graph, and
        # charmlp's forward does not compute the gradients it would otherwise (see
        # ops.mlp_cross_entropy); the training cost is forward + backward.
        block = Block("arm.forward(idx, y)", "arm.zero_grad()", g, device)

        def sample(inner: int) -> float:
            with torch.no_grad():
                return block(inner)

        return sample
    if what == "backward":
        block = Block("arm.backward(loss)", "arm.zero_grad()\nloss = arm.forward(idx, y)", g, device)
        return lambda inner: block(1)
    stmt = {"fwd_bwd": "arm.fwd_bwd(idx, y)", "step": "arm.train_step(idx, y)"}[what]
    return Block(stmt, "pass", g, device)


def _gate_arms(arm_factories, params, size, idx, y, ref, cfg, log) -> tuple[list[Arm], list[ArmResult]]:
    """Sets up and gates every arm; returns the arms that passed and every arm's result."""
    arms: list[Arm] = []
    results: list[ArmResult] = []
    for make in arm_factories:
        arm = make()
        r = ArmResult(arm.name, arm.label, arm.description)
        results.append(r)
        ok, why = arm.available(cfg.device)
        if not ok:
            r.status, r.reason = "SKIPPED", why
            log(f"  {arm.name:16s} SKIPPED ({why})")
            continue
        t0 = time.perf_counter()
        try:
            arm.setup(params, size, idx, y, cfg.lr)
            r.gate = check_arm(arm, params, idx, y, ref, cfg.lr)
        except Exception as e:  # an arm that crashes is reported, the rest goes on
            r.status, r.reason = "ERROR", f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log(f"  {arm.name:16s} ERROR {r.reason}")
            continue
        finally:
            r.setup_s = time.perf_counter() - t0
        passed, why = gate_passes(r.gate)
        worst = max(r.gate.values()) if r.gate else math.nan
        if passed:
            r.status = "PASS"
            arms.append(arm)
            log(f"  {arm.name:16s} gate PASS (max rel.err {worst:.1e}; setup {r.setup_s:.1f}s)")
        else:
            r.status, r.reason = "FAILED", why
            log(f"  {arm.name:16s} gate FAILED: {why}")
    return arms, results


def _time_arms(arms: list[Arm], by_name: dict[str, ArmResult], idx, y, cfg: Config, log) -> tuple[int, dict]:
    """Warm-up rounds (which also size the blocks and the number of rounds), then interleaved
    timed rounds; fills each arm's times, samples and calls per block. Returns (planned
    rounds, contention record)."""
    plan = [(a, m) for m in MEASUREMENTS for a in arms if m in a.measurements]
    sample = {(a.name, m): measurement(a, m, idx, y, cfg.device) for a, m in plan}
    gc.collect()
    first: dict[tuple[str, str], float] = {}
    for _ in range(cfg.warmup_rounds):
        for a, m in plan:
            first[(a.name, m)] = sample[(a.name, m)](1)
    inner = {k: 1 if k[1] == "backward" else choose_inner(t, cfg.block_s) for k, t in first.items()}
    round_s = sum(first[k] * inner[k] for k in first)
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9))))
    for (name, m), n in inner.items():
        by_name[name].inner[m] = n
    groups = [[((a.name, m), (lambda k=(a.name, m): sample[k](inner[k]))) for a in arms if m in a.measurements]
              for m in MEASUREMENTS]
    # rounds during which other processes used the CPU are dropped and redone (up to 3x the
    # planned number of rounds in all); if too few clean rounds come, the dropped ones are
    # used too and the size is flagged as contended
    r = timed_rounds([g for g in groups if g], repeats)
    contended = r.kept < repeats
    samples = r.with_spare() if contended else r.samples
    for (name, m), s in samples.items():
        by_name[name].samples[m] = s
        by_name[name].times[m] = summarize(s)
    contention = {"kept_rounds": r.kept, "dropped_rounds": r.dropped, "contended": contended,
                  "others_cpu_share": r.others_cpu_share}
    log(f"  timed {r.kept} clean rounds (round {round_s * 1e3:.1f} ms); dropped {r.dropped} during which other "
        f"processes ran; others' CPU share {100 * r.others_cpu_share:.1f}%"
        + (" -- CONTENDED: not enough clean rounds, all rounds used" if contended else ""))
    return repeats, contention


def _measure_memory(arms: list[Arm], by_name: dict[str, ArmResult], size: Size, params, idx, y, cfg: Config,
                    log) -> None:
    """Tensor allocations of a warm step (every arm), resident-set growth in fresh processes
    (CPU, sizes in ``cfg.rss_sizes``)."""
    for a in arms:
        a.load(params)
        a.zero_grad()
        try:
            a.train_step(idx, y)  # warm (compiles, first-call allocations) before measuring
            by_name[a.name].peak_memory_bytes = peak_memory(lambda: a.train_step(idx, y), cfg.device)
        except Exception as e:  # pragma: no cover - profiler trouble
            log(f"  {a.name}: memory measurement failed: {e}")
    if cfg.device.type == "cpu" and size.name in cfg.rss_sizes:
        probe = [a.name for a in arms if a.name in ARMS]
        for name, r in rss_memory(probe, size, cfg, log).items():
            by_name[name].rss = r
            by_name[name].rss_peak_bytes = r.get("peak_bytes")
        log("  RSS probes: " + ", ".join(f"{n} {fmt_bytes(by_name[n].rss_peak_bytes)}" for n in probe))


def bench_size(size: Size, arm_factories: list[Callable[[], Arm]], cfg: Config,
               log: Callable[[str], None] = print, time_it: bool = True) -> dict:
    """Gate, time and measure the memory of every arm at one size."""
    idx, y, source = make_batch(size, cfg.data, cfg.device, cfg.seed)
    B = idx.shape[0]
    params = make_params(size, cfg.device)
    ref = reference(params, idx, y, cfg.lr)
    torch._dynamo.reset()
    log(f"[{size.name}] B={B:,} T={size.T} E={size.E} H={size.H} V={size.V}; data: {source}")
    arms, results = _gate_arms(arm_factories, params, size, idx, y, ref, cfg, log)
    by_name = {r.name: r for r in results}
    repeats, contention = 0, {}
    if time_it and arms:
        repeats, contention = _time_arms(arms, by_name, idx, y, cfg, log)
    if cfg.memory:
        _measure_memory(arms, by_name, size, params, idx, y, cfg, log)
    for a in arms:
        a.teardown()
    torch._dynamo.reset()
    return {
        "size": dataclasses.asdict(size),
        "name": size.name,
        "B": B,
        "data": source,
        "flops_step": size.flops(B, "step"),
        "repeats": repeats,
        "contention": contention,
        "arms": [dataclasses.asdict(r) for r in results],
    }


def run_suite(sizes: list[Size], arm_names: list[str] | None, cfg: Config,
              extra_arms: dict[str, Callable[[], Arm]] | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Gates and times every arm at every size; returns the JSON-able results."""
    registry = dict(ARMS)
    registry.update(extra_arms or {})
    # CUDA-only arms are left out of the default list on a CPU (asked for by name, they
    # are reported as SKIPPED)
    names = arm_names or [n for n in DEFAULT_ARMS if n in registry
                          and (cfg.device.type == "cuda" or not registry[n].cuda_only)]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {list(registry)}")
    t0 = time.perf_counter()
    out = {"environment": environment(cfg.device, cfg.threads),
           "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(cfg).items()},
           "arms": names, "reference_arm": REFERENCE_ARM, "gate_rtol": GATE_RTOL}
    log(f"charmlp benchmark on {cfg.device} ({cpu_model()}), {cfg.threads} threads, torch {torch.__version__}")
    load = out["environment"]["loadavg_start"]
    if load and cfg.device.type == "cpu" and load[0] > 0.5:
        log(f"warning: the machine is busy (load average {load[0]:.2f}): CPU timings will be noisy")
    sgemm = {"repeats": 3 if cfg.quick else 7, "n": 512 if cfg.quick else None}
    out["sgemm_start"] = measure_sgemm_peak(cfg.device, **sgemm)
    log(f"SGEMM peak: {out['sgemm_start']['gflops']:.1f} GFLOP/s (n={out['sgemm_start']['n']})")
    out["sizes"] = [bench_size(s, [registry[n] for n in names], cfg, log) for s in sizes]
    out["sgemm_end"] = measure_sgemm_peak(cfg.device, **sgemm)
    out["environment"]["loadavg_end"] = loadavg()
    out["sgemm_peak_gflops"] = max(out["sgemm_start"]["gflops"], out["sgemm_end"]["gflops"])
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def run_embed_ablation(sizes: list[Size], cfg: Config, log: Callable[[str], None] = print) -> dict:
    """charmlp's CPU embedding algorithms (direct gather-GEMM vs folded gather-sum vs the
    cost model's pick) head to head, gated and interleaved like the arms."""
    algos = ["direct", "folded", "auto"]
    factories = [(lambda a=a: CharmlpAlgorithmArm(a)) for a in algos]
    t0 = time.perf_counter()
    res = [bench_size(s, factories, cfg, log) for s in sizes]
    return {"algorithms": algos, "sizes": res, "elapsed_s": time.perf_counter() - t0}
