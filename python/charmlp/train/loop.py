"""The training loop: chunks of steps, and the two ways a step runs.

:func:`_train_loop` trains chunk after chunk of steps (~0.2 s each, 16 to 2,000 steps,
never across an evaluation or a checkpoint). A chunk (:func:`_train_chunk`) draws its
minibatches at once and runs its steps (:func:`_train_steps`) on one of two paths:

* plain SGD in a single process, :func:`_fused_sgd_steps`: the whole chunk in one op call,
  ``model.sgd_steps`` (``torch.ops.charmlp.mlp_sgd_steps``), which does the fused forward,
  backward and update of each step back to back in C++, bitwise the steps a loop of
  ``model.sgd_step`` would take, without a Python round trip per step;
* AdamW, SGD with weight decay, and any optimizer under torchrun (DDP),
  :func:`_optimizer_steps`: the loop users write, a step at a time
  (:func:`_optimizer_step`: ``logits, loss = net(x, y)``, ``opt.zero_grad()``,
  ``loss.backward()``, ``opt.step()``) with a fused ``torch.optim`` optimizer. On the fused
  model the forward is one op that also computes the gradients, and the backward only
  hands them over; under DDP its hooks all-reduce them.

``--reference`` takes the same paths with the model in plain PyTorch ops. After each chunk
the ranks agree on stopping and on divergence (:func:`_agree_or_diverge`), then the
evaluation and the checkpoint run when due (:func:`_when_due`).
"""

from __future__ import annotations

import math
import time

import torch

from ..model import MLPLanguageModel
from .config import TrainConfig, learning_rate
from .dataset import draw_batches
from .distributed import _agree
from .errors import TrainingInterrupted
from .evaluation import _diverged, evaluate
from .progress import Progress
from .report import _end_diverged
from .signals import _StopRequest
from .state import _Run, _save_checkpoint

#: The first chunk's length in steps; the next ones take ~0.2 s of steps (16 to 2,000).
FIRST_CHUNK = 64


def _train_loop(run: _Run, bar: Progress) -> None:
    """Train from ``run.step`` to ``run.cfg.steps``.

    Ctrl-C or SIGTERM stops after the current step (plain SGD and, under torchrun, every
    path: after the current chunk of steps, ~0.2 s) and writes a checkpoint first; then
    :class:`~charmlp.train.TrainingInterrupted`. A diverged step ends the run with
    :class:`~charmlp.train.TrainingDiverged` (see :mod:`charmlp.train.report`).
    """
    cfg = run.cfg
    run.last_lr = learning_rate(cfg, run.step)
    chunk = FIRST_CHUNK
    run.model.train()
    with _StopRequest(enabled=True, notify=lambda m: (bar.clear(), run.say(m)),
                      distributed=run.d.enabled) as stop:
        while run.step < cfg.steps:
            first = run.step
            lrs, losses, elapsed = _train_chunk(run, _chunk_end(cfg, first, chunk) - first, stop)
            if run.d.is_main:
                run.files.log_steps(first, lrs, losses)
            run.step += len(losses)
            if lrs:
                run.last_lr = lrs[-1]
            if losses:
                chunk = int(min(2000, max(16, len(losses) / max(elapsed, 1e-9) * 0.2)))
            bar.update(run.step, losses, run.last_lr, run.train_time)
            stop_now, chunk = _agree_or_diverge(run, bar, stop.requested, first, losses, chunk)
            if stop_now:
                bar.clear()
                _checkpoint(run)
                raise TrainingInterrupted(run.step, run.run_dir)
            _when_due(run, bar)
    bar.update(run.step, [], run.last_lr, run.train_time, force=True)


def _chunk_end(cfg: TrainConfig, s: int, chunk: int) -> int:
    """Where the chunk that starts at step ``s`` ends: ``chunk`` steps later, or earlier at
    the end of the run or at the next evaluation or checkpoint."""
    stop = min(cfg.steps, s + chunk)
    for every in (cfg.eval_every, cfg.checkpoint_every):
        if every > 0:
            stop = min(stop, (s // every + 1) * every)
    return stop


def _train_chunk(run: _Run, k: int, stop: _StopRequest) -> tuple[list[float], list[float], float]:
    """The next ``k`` steps: draw their minibatches, run them, time them. Returns the
    learning rates and losses of the steps taken (fewer than ``k`` when ``stop`` was
    requested in a single process) and the seconds they took."""
    cfg, ntr = run.cfg, run.Xtr.shape[0]
    state0 = run.gen.get_state()
    ix = draw_batches(run.gen, ntr, k, cfg.batch_size).to(run.device, non_blocking=True)
    xs, ys = run.Xtr[ix], run.Ytr[ix]
    t0 = time.perf_counter()
    # (under DDP a stop is agreed at the chunk's end: every rank stops at the same step)
    lrs, losses = _train_steps(cfg, run.model, run.net, run.opt, xs, ys, run.step,
                               None if run.d.enabled else stop)
    elapsed = time.perf_counter() - t0
    run.train_time += elapsed
    if len(losses) < k:  # rewind the generator to exactly the draws of the steps taken
        run.gen.set_state(state0)
        draw_batches(run.gen, ntr, len(losses), cfg.batch_size)
    return lrs, losses, elapsed


def _train_steps(cfg: TrainConfig, model: MLPLanguageModel, net: torch.nn.Module,
                 opt: torch.optim.Optimizer | None, xs: torch.Tensor, ys: torch.Tensor, first: int,
                 stop: _StopRequest | None = None) -> tuple[list[float], list[float]]:
    """Steps ``first, first + 1, ...`` on the minibatches ``xs[j], ys[j]``: the fused SGD
    chunk when there is no optimizer, else the optimizer's loop. Returns the steps' learning
    rates and losses (each before its step's update); fewer steps when ``stop`` is requested."""
    if opt is None:
        lrs, losses = _fused_sgd_steps(cfg, model, xs, ys, first, stop)
    else:
        lrs, losses = _optimizer_steps(cfg, net, opt, xs, ys, first, stop)
    if xs.device.type != "cpu":
        torch.cuda.synchronize(xs.device)
    return lrs, losses


def _fused_sgd_steps(cfg: TrainConfig, model: MLPLanguageModel, xs: torch.Tensor, ys: torch.Tensor,
                     first: int, stop: _StopRequest | None) -> tuple[list[float], list[float]]:
    """Plain SGD: the whole chunk in one op call (``mlp_sgd_steps``); a stop request is seen
    between chunks (~0.2 s)."""
    if stop is not None and stop.requested:
        return [], []
    lrs = [learning_rate(cfg, first + j) for j in range(len(xs))]
    return lrs, model.sgd_steps(xs, ys, lrs).tolist()


def _optimizer_steps(cfg: TrainConfig, net: torch.nn.Module, opt: torch.optim.Optimizer,
                     xs: torch.Tensor, ys: torch.Tensor, first: int,
                     stop: _StopRequest | None) -> tuple[list[float], list[float]]:
    """A step at a time through the optimizer; a stop request is seen after each step."""
    on_cpu = xs.device.type == "cpu"
    lrs, losses = [], []
    for j in range(len(xs)):
        if stop is not None and stop.requested:
            break
        lr = learning_rate(cfg, first + j)
        loss = _optimizer_step(net, opt, xs[j], ys[j], lr)
        losses.append(float(loss) if on_cpu else loss)
        lrs.append(lr)
    if not on_cpu:
        losses = torch.stack(losses).tolist() if losses else []
    return lrs, losses


def _optimizer_step(net: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor,
                    yb: torch.Tensor, lr: float) -> torch.Tensor:
    # The loop users write: on the fused model, model(x, y) is one op computing the
    # logits, the loss and the gradients, and backward() hands them over. Under DDP (net
    # wraps the model) its hooks all-reduce the gradients as AccumulateGrad sets them.
    for group in opt.param_groups:
        group["lr"] = lr
    logits, loss = net(xb, yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _agree_or_diverge(run: _Run, bar: Progress, stop: bool, first: int, losses: list[float],
                      chunk: int) -> tuple[bool, int]:
    """After the chunk of steps from ``first``: agree with the other ranks on stopping and
    the next chunk's length (returned), and end the run if any rank diverged.

    A rank's divergence is its first step whose loss diverged (see
    :func:`~charmlp.train.evaluation._diverged`), or, when only the parameters overflowed,
    the chunk's last step (each loss is computed before its step's update).
    """
    bad = next((i for i, x in enumerate(losses) if _diverged(x)), None)
    bad_step, bad_loss = (math.inf, None) if bad is None else (first + bad, losses[bad])
    if bad is None and not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        bad_step = run.step - 1
    local_bad = bad_step
    stop_now, bad_step, chunk = _agree(run.d, stop, bad_step, chunk)
    if bad_step < math.inf:
        bar.clear()
        what = ("loss" if bad is not None and bad_step == local_bad
                else "parameters are no longer finite" if bad_step == local_bad
                else "a diverged loss on another rank")
        _end_diverged(run, int(bad_step), bad_loss if bad_step == local_bad else None, what)
    return stop_now, chunk


def _due(every: int, s: int, steps: int) -> bool:
    return every > 0 and s % every == 0 and s < steps


def _when_due(run: _Run, bar: Progress) -> None:
    """The periodic evaluation (rank 0) and checkpoint, at their steps (not the last one:
    the final evaluation and checkpoint follow the loop)."""
    cfg = run.cfg
    if _due(cfg.eval_every, run.step, cfg.steps) and run.d.is_main:
        _evaluate_now(run, bar)
    if _due(cfg.checkpoint_every, run.step, cfg.steps):
        _checkpoint(run)


def _evaluate_now(run: _Run, bar: Progress) -> None:
    """Rank 0: the full train and dev losses, to ``evals.csv``, ``on_eval`` and the log."""
    t_eval = time.perf_counter()
    run.model.eval()
    tr = evaluate(run.model, run.Xtr, run.Ytr, run.cfg.eval_batch_size)
    dev = evaluate(run.model, *(t.to(run.device) for t in run.data.tensors["dev"]), run.cfg.eval_batch_size)
    run.model.train()
    if run.on_eval is not None:
        run.on_eval({"step": run.step, "train": tr, "dev": dev, "final": False,
                     "train_time_s": run.train_time, "eval_time_s": run.eval_time,
                     "wall_time_s": t_eval - run.wall0})
    run.eval_time += time.perf_counter() - t_eval
    run.files.log_eval(run.step, tr, dev)
    bar.clear()
    run.say(f"step {run.step:,}: train {tr:.4f}  dev " + ("n/a" if dev is None else f"{dev:.4f}"))


def _checkpoint(run: _Run) -> None:
    """Write the metrics so far and the checkpoint of ``run.step`` (every rank takes part)."""
    if run.d.is_main:
        run.files.flush()
    _save_checkpoint(run)
