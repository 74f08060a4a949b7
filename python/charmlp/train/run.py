"""``charmlp train``: :func:`train` sets a run up, hands it to the loop, and reports.

Read top-down: :func:`train` → :func:`_train_in` (the run directory to create or to
resume; the process group) → :func:`_train`: :func:`_start` (data, run directory, model,
optimizer, the time budget or the checkpoint to continue from), then
:func:`~charmlp.train.loop._train_loop`, the final checkpoint and
:func:`~charmlp.train.report._final_report`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import CHECKPOINT_NAME, CheckpointError, WriteError, atomic_write_json, load_checkpoint
from .budget import _measure_budget
from .config import ConfigError, TrainConfig, resume_config
from .dataset import _prepare_data
from .distributed import _broadcast, _Dist, _env_rank, _gather, _process_group
from .loop import _checkpoint, _train_loop
from .progress import Progress
from .report import _final_report
from .rundir import _create_run_dir, _new_run_dir, _Ownership, _resume_dir, _RunFiles
from .state import _check_device, _new_run, _restore, _Run


def train(cfg: TrainConfig | None, out: str | Path | None = None, *, resume: str | Path | None = None,
          overrides: dict | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
          progress_stream=None, on_eval: Callable[[dict], None] | None = None) -> dict:
    """Train (or, with ``resume=RUN_DIR``, continue) a model; return the results dict.

    ``cfg`` is ignored when resuming: the run's saved config is used, with ``overrides``
    (see :func:`resume_config`); ``resume`` may also name the run's ``checkpoint.pt``.
    Results are also written to ``RUN_DIR/results.json``. The run directory is locked for
    the whole call (:class:`~charmlp.checkpoint.RunDirInUse` if another process has it).
    Under torchrun, call it on every rank; only rank 0 prints, locks and writes files.

    ``cfg.time_budget`` (seconds) trains for that wall time instead of ``cfg.steps``: the
    step count is fixed from a measurement of the step rate at the start (see
    :func:`~charmlp.train.budget._measure_budget`), and the run is then exactly the
    ``steps=N`` run, schedule, checkpoints and resume included (a resumed run finishes the
    same N steps). The budget counts from this call to the final report (evaluations,
    checkpoints, samples included).

    ``on_eval`` (rank 0) is called after each evaluation with a dict: ``step``, ``train``
    and ``dev`` losses, ``final``, ``train_time_s``, ``wall_time_s`` (from this call's start
    to this evaluation's) and ``eval_time_s`` (seconds spent in the earlier evaluations), so
    ``wall_time_s - eval_time_s`` is the wall time that the evaluations did not take.
    """
    wall0 = time.perf_counter()
    if resume is None and cfg is None:
        raise TypeError("train() needs a TrainConfig, or resume=RUN_DIR")
    with _Ownership() as own:
        try:
            return _train_in(cfg, out, resume, overrides, own, progress, log, progress_stream, wall0,
                             on_eval)
        except OSError as e:  # a failed write (read-only or full disk): one line naming the path
            if isinstance(e, (TimeoutError, ConnectionError)) or e.errno is None:
                raise
            where = own.run_dir or resume or out or "the run directory"
            raise WriteError.from_os_error(e, where) from e


def _train_in(cfg, out, resume, overrides, own: _Ownership, progress, log, progress_stream,
              wall0, on_eval=None) -> dict:
    ckpt, default_name = None, False
    if resume is not None:
        run_dir, ckpt = _open_to_resume(resume, own)
        cfg = resume_config(ckpt["train_config"], overrides or {})
    cfg = cfg.resolved()
    if resume is None:
        run_dir, default_name = _new_run_dir(out)
    _check_device(cfg)
    with _process_group(cfg.device) as d:
        return _train(cfg, run_dir, default_name, ckpt, d, own, progress, log,
                      progress_stream, wall0, on_eval)


def _open_to_resume(resume: str | Path, own: _Ownership) -> tuple[Path, dict]:
    """``--resume``'s run directory, locked (rank 0), and its checkpoint."""
    run_dir = _resume_dir(resume)
    if _env_rank() == 0 and (run_dir / CHECKPOINT_NAME).is_file():
        # Before reading the checkpoint: a live writer could replace it meanwhile. (Not in
        # a directory without one: that is no run, and load_checkpoint says so.)
        own.take(run_dir, fresh=False)
    ckpt = load_checkpoint(run_dir)
    if isinstance(ckpt.get("diverged"), dict):
        raise ConfigError(f"{run_dir}: the run diverged at step {ckpt['diverged'].get('step', '?'):,} "
                          f"and would diverge again (a resumed run keeps its learning rate); "
                          f"start a new run with a lower --lr")
    return run_dir, ckpt


def _train(cfg, run_dir: Path, default_name: bool, ckpt, d: _Dist, own: _Ownership, progress, log,
           progress_stream, wall0, on_eval=None) -> dict | None:
    """Set the run up, train it, write the final checkpoint and (rank 0) the results."""
    say = (log or (lambda s: print(s, flush=True))) if d.is_main else (lambda s: None)
    run = _start(cfg, run_dir, default_name, ckpt, d, own, say, wall0, on_eval)
    _announce(run)
    with Progress(run.cfg.steps, run.step, progress_stream, enabled=progress and d.is_main,
                  start_time=run.train_time) as bar:
        _train_loop(run, bar)
    _checkpoint(run)
    return _final_report(run) if d.is_main else None


def _start(cfg: TrainConfig, run_dir: Path, default_name: bool, ckpt: dict | None, d: _Dist,
           own: _Ownership, say, wall0: float, on_eval) -> _Run:
    """Everything before the first step: the data, the run directory (created and locked
    once the data is known to be good), the model and optimizer, then the time budget's
    step count or the checkpoint's state, and the run's first files."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda", d.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if ckpt is not None:
        _check_ranks_checkpoint(ckpt, d, run_dir)
    say(f"run directory: {run_dir}" + (f" (resuming at step {ckpt['step']:,})" if ckpt else ""))
    data = _prepare_data(cfg, ckpt, say)
    if d.is_main and ckpt is None:  # only once the data is known to be good, so a bad --data leaves no empty run
        run_dir = _create_run_dir(run_dir, default_name, say)
        own.take(run_dir, fresh=True)  # before anything is written there
    if d.enabled:  # rank 0's directory (each rank drew its own default name) in every rank's messages
        run_dir = Path(_broadcast(d, str(run_dir)))
    run = _new_run(cfg, d, device, run_dir, data, say, wall0, on_eval, resumed=ckpt is not None)
    if ckpt is not None:
        run.budget = ckpt.get("budget")
        _restore(run, ckpt)
    elif cfg.time_budget is not None:
        _fix_budget(run)
    if d.is_main:
        _write_run_start(run)
    return run


def _check_ranks_checkpoint(ckpt: dict, d: _Dist, run_dir: Path) -> None:
    """A resumed run has the same number of processes, and under torchrun every rank read
    the same checkpoint."""
    if ckpt["world_size"] != d.world_size:
        raise CheckpointError(f"{run_dir}: the run was trained with {ckpt['world_size']} process(es); "
                              f"resume it with the same number (now {d.world_size})")
    if d.enabled:
        # Each rank read the checkpoint itself: all must have read the same one.
        steps = _gather(d, ckpt["step"])
        if len(set(steps)) > 1:
            raise CheckpointError(f"{run_dir}: the ranks read different checkpoints (steps {steps}); "
                                  f"was another process writing it? Resume again")


def _fix_budget(run: _Run) -> None:
    """``--time-budget``: measure, then make the run the ``steps=N`` run that fits."""
    run.budget = budget = _measure_budget(run)
    cfg = run.cfg = dataclasses.replace(run.cfg, steps=budget["steps"])
    run.say(f"time budget {cfg.time_budget:g} s: {budget['steps_per_s']:,.0f} steps/s over "
            f"{budget['probe_s']:.1f} s (on a throwaway copy of the state), an evaluation ~"
            f"{budget['eval_s']:.2f} s, the final report ~{budget['final_s']:.2f} s: "
            f"{cfg.steps:,} steps, the {cfg.lr_schedule} schedule laid over them")


def _write_run_start(run: _Run) -> None:
    """Rank 0: ``config.json``, ``split.json``, and the metrics files opened (a resumed
    run's cut back to its checkpoint's step)."""
    data = run.data
    config_doc = {"train_config": run.cfg.to_dict(), "model": run.model.config(), "parameters": run.nparams,
                  "corpus": data.corpus, "vocab": data.vocab.to_dict(), "world_size": run.d.world_size}
    if run.budget is not None:
        config_doc["time_budget"] = run.budget
    atomic_write_json(run.run_dir / "config.json", config_doc)
    atomic_write_json(run.run_dir / "split.json", data.split.to_dict())
    run.files = _RunFiles(run.run_dir, run.step)


def _announce(run: _Run) -> None:
    cfg = run.cfg
    how = ("" if cfg.reference else
           " (fused steps, a chunk per op call)" if run.fast_sgd
           else " (the fused model's one-op forward and backward, then fused torch.optim)")
    run.say(f"training: {cfg.steps:,} steps of batch {cfg.batch_size}"
            + (" per process" if run.d.enabled else "")
            + f", {cfg.optimizer}{how}, lr {cfg.lr_schedule} "
            f"{cfg.lr:g}" + (f" -> {cfg.lr_final:g}" if cfg.lr_schedule != "constant" else "")
            + (f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else ""))
