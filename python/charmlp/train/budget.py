"""``--time-budget``: how many steps fit in a wall-clock budget.

``time_budget`` (``--time-budget SECONDS``) trains for a wall-clock budget instead of a
step count: the step rate is measured on a throwaway copy of the training state for ~1 % of
the budget (0.3-2 s), with the cost of an evaluation, a checkpoint and the final report,
and the number of steps that fits is fixed before the first step (:func:`budget_steps`;
under torchrun rank 0's count, broadcast). The schedule is laid over those steps, and the
run is then exactly the ``steps=N`` run: the count is in its config and checkpoints, so a
resumed run finishes the same N steps. A machine that slows down after the measurement
(other processes) makes the run late rather than cut its schedule short.
"""

from __future__ import annotations

import math
import time

import torch

from ..checkpoint import atomic_write, verify_file
from ..sample import sample_words
from .config import ConfigError
from .dataset import batch_seed
from .distributed import _agree, _broadcast
from .evaluation import evaluate
from .loop import _train_steps
from .state import _make_optimizer, _Run

#: The share of the budget spent measuring the step rate before the step count is fixed,
#: and its bounds in seconds (the measurement counts in the budget).
BUDGET_PROBE_SHARE = 0.01
BUDGET_PROBE_MIN_S, BUDGET_PROBE_MAX_S = 0.3, 2.0


def _every_count(every: int, steps: int) -> int:
    """How many times a periodic evaluation or checkpoint runs in a run of ``steps`` steps
    (at steps ``every, 2 every, ...`` below ``steps``; the final one is separate)."""
    return (steps - 1) // every if every > 0 and steps > 0 else 0


def budget_steps(seconds: float, step_s: float, eval_every: int = 0, eval_s: float = 0.0,
                 checkpoint_every: int = 0, checkpoint_s: float = 0.0) -> int:
    """The most steps that fit in ``seconds``: each step takes ``step_s``, and every
    ``eval_every`` (``checkpoint_every``) steps an evaluation (a checkpoint) takes
    ``eval_s`` (``checkpoint_s``). 0 when not even one step fits."""
    if not seconds > 0 or not step_s > 0:
        return 0

    def cost(n: int) -> float:
        return (n * step_s + _every_count(eval_every, n) * eval_s
                + _every_count(checkpoint_every, n) * checkpoint_s)

    lo, hi = 0, int(seconds / step_s) + 1  # cost(lo) <= seconds < cost(hi); cost grows with n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid)
    return lo


def _measure_budget(run: _Run) -> dict:
    """Fix the number of steps so that the whole run, from :func:`~charmlp.train.train`'s
    start to its final report, takes ``cfg.time_budget`` seconds. Returns the estimate
    (``steps`` among it), the same on every rank.

    The step rate is measured on the run's own model, training path and data (the chunks of
    steps the loop takes, the minibatch draws and gathers, the learning rates, the metrics
    rows, the finiteness check; under DDP the gradient all-reduce) for
    :data:`BUDGET_PROBE_SHARE` of the budget (0.3-2 s), on minibatches of a separate
    generator with a throwaway optimizer; then the parameters are put back bitwise, so the
    run is exactly the ``--steps N`` run it fixed (the measurement's time counts in the
    budget). Rank 0 also times an evaluation (per example, for the periodic and the final
    evaluations), a checkpoint's serialization and the final samples; it solves for the
    steps that fit (:func:`budget_steps`) and broadcasts them.
    """
    budget = float(run.cfg.time_budget)
    probe_s = min(BUDGET_PROBE_MAX_S, max(BUDGET_PROBE_MIN_S, BUDGET_PROBE_SHARE * budget))
    saved = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    opt = None if run.fast_sgd else _make_optimizer(run.cfg, run.model)
    probe = _probe_step_rate(run, opt, probe_s)
    with torch.no_grad():
        run.model.load_state_dict(saved)
    for p in run.model.parameters():
        p.grad = None
    info = _fit_steps(run, opt, budget, probe) if run.d.is_main else None
    del opt
    info = _broadcast(run.d, info)
    if info["steps"] < 1:
        raise ConfigError(f"--time-budget {budget:g} s leaves no time to train: loading the data and "
                          f"measuring the speed took {info['setup_s']:.1f} s and the final evaluation "
                          f"needs ~{info['final_s']:.1f} s; give a larger budget")
    return info


def _probe_chunk(run: _Run, opt, gen: torch.Generator, k: int) -> None:
    """``k`` training steps as the loop takes them (on the probe's own minibatches)."""
    cfg = run.cfg
    ix = torch.randint(0, run.Xtr.shape[0], (k, cfg.batch_size), generator=gen).to(run.device, non_blocking=True)
    lrs, losses = _train_steps(cfg, run.model, run.net, opt, run.Xtr[ix], run.Ytr[ix], 0)
    "".join(f"{j},{lr:.6g},{x:.6f}\n" for j, (lr, x) in enumerate(zip(lrs, losses)))  # (the rows' cost)
    all(bool(torch.isfinite(p).all()) for p in run.model.parameters())


def _probe_step_rate(run: _Run, opt, probe_s: float) -> dict:
    """Train chunks of steps for ``probe_s`` seconds: the seconds per step, and the probe's
    steps and time (every rank takes the same chunks)."""
    # Its own minibatch stream (torch.randint, as draw_batches draws): the run's generator
    # is not touched.
    gen = torch.Generator().manual_seed(batch_seed(run.cfg.seed, run.d.rank) ^ 0x5EED)
    run.model.train()
    t_start = time.perf_counter()
    _probe_chunk(run, opt, gen, 16)  # warm-up: first-call costs (allocations, threads, the optimizer's state)
    t0 = time.perf_counter()
    _probe_chunk(run, opt, gen, 64)
    warm = 64 + 16
    rate = 64 / max(time.perf_counter() - t0, 1e-9)
    steps, spent = 0, 0.0
    k = int(min(2000, max(16, rate * 0.1)))
    _, _, k = _agree(run.d, False, math.inf, k)  # (under DDP every rank takes the same chunks)
    while True:
        t0 = time.perf_counter()
        _probe_chunk(run, opt, gen, k)
        dt = time.perf_counter() - t0
        steps, spent = steps + k, spent + dt
        rate = steps / spent if spent > 0 else 1e6
        left = probe_s - (time.perf_counter() - t_start)
        k = int(min(2000, max(16, rate * min(0.1, max(left, 0.0)))))
        done, _, k = _agree(run.d, left <= 0, math.inf, k)
        if done:
            break
    return {"step_s": spent / steps, "steps": steps + warm, "elapsed": time.perf_counter() - t_start}


def _fit_steps(run: _Run, opt, budget: float, probe: dict) -> dict:
    """Rank 0: time an evaluation, a checkpoint and the final report, and solve for the
    steps that fit in what is left of the budget. Returns the estimate."""
    cfg, model, data = run.cfg, run.model, run.data
    model.eval()
    per_row = _eval_s_per_example(run)
    rows = {name: t[0].shape[0] for name, t in data.tensors.items()}
    eval_s = per_row * (rows["train"] + rows["dev"])
    checkpoint_s = _checkpoint_s(run, opt)
    t0 = time.perf_counter()
    sample_words(model, data.vocab, cfg.num_samples, torch.Generator().manual_seed(0),
                 train_words=data.split.train)
    final_s = (time.perf_counter() - t0 + checkpoint_s + per_row * sum(rows.values()) + 0.02)
    model.train()
    setup_s = time.perf_counter() - run.wall0
    step_s = probe["step_s"]
    n = budget_steps(budget - setup_s - final_s, step_s, cfg.eval_every, eval_s,
                     cfg.checkpoint_every, checkpoint_s)
    return {"budget_s": budget, "steps": n, "steps_per_s": 1.0 / step_s,
            "probe_s": probe["elapsed"], "probe_steps": probe["steps"], "setup_s": setup_s,
            "eval_s": eval_s, "evaluations": _every_count(cfg.eval_every, n),
            "checkpoint_s": checkpoint_s, "checkpoints": _every_count(cfg.checkpoint_every, n),
            "final_s": final_s}


def _eval_s_per_example(run: _Run) -> float:
    """Seconds per example of an evaluation (the best of two, on up to 50,000 examples)."""
    X, Y = run.data.tensors["dev"]
    if X.shape[0] < 1000:
        X, Y = run.data.tensors["train"]
    X, Y = X[:50_000].to(run.device), Y[:50_000].to(run.device)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        evaluate(run.model, X, Y, run.cfg.eval_batch_size)
        times.append(time.perf_counter() - t0)
    return min(times) / X.shape[0]


def _checkpoint_s(run: _Run, opt) -> float:
    """Seconds to write a checkpoint of this size (temp file, fsync, verify, rename): the
    best of two."""
    data = run.data
    state = {"model": run.model.state_dict(), "optimizer": opt.state_dict() if opt is not None else None,
             "split": data.split.to_dict(), "corpus": data.corpus, "vocab": data.vocab.to_dict()}
    probe_file = run.run_dir / ".budget-probe.pt"
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        atomic_write(probe_file, lambda f: torch.save(state, f), verify=verify_file)
        times.append(time.perf_counter() - t0)
    probe_file.unlink(missing_ok=True)
    return min(times)
