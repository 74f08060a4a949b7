"""The end of a run: the final evaluation, ``results.json`` and ``samples.txt``, the summary
printed, and the consistent run directory a diverged run leaves.

Divergence: a minibatch loss that is not finite, or so large that its perplexity
overflows a float (> 709.78 nats, where a uniform guess is ln(vocabulary size) ~ 3.3), or
parameters that stopped being finite, end the run with
:class:`~charmlp.train.TrainingDiverged`. The run directory stays consistent: the metrics
up to that point, a checkpoint of the diverged state (the previous checkpoint is kept as
``checkpoint-step<N>.pt``) and a ``results.json`` whose ``diverged`` entry says where; its
losses may be ``"inf"`` or ``"nan"``.
"""

from __future__ import annotations

import time

import torch

from ..checkpoint import atomic_write_json, atomic_write_text
from ..sample import format_samples, sample_words
from .errors import TrainingDiverged
from .distributed import _barrier
from .evaluation import _diverged, evaluate, format_losses, loss_report
from .rundir import RESULTS_NAME, _keep_last_good
from .state import _Run, _save_checkpoint


def _final_reports(run: _Run) -> dict:
    """Every split's loss report (rank 0)."""
    run.model.eval()
    return {name: loss_report(evaluate(run.model, X.to(run.device), Y.to(run.device),
                                       run.cfg.eval_batch_size), X.shape[0])
            for name, (X, Y) in run.data.tensors.items()}


def _results_doc(run: _Run, reports: dict, samples: list, diverged: dict | None = None) -> dict:
    """``results.json``'s content."""
    cfg, step, train_time = run.cfg, run.step, run.train_time
    doc = {
        "run_dir": str(run.run_dir),
        "steps": step,
        "losses": reports,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - run.wall0,
        "steps_per_s": step / train_time if train_time > 0 else None,
        "examples_per_s": step * cfg.batch_size * run.d.world_size / train_time if train_time > 0 else None,
        "world_size": run.d.world_size,
        "threads": torch.get_num_threads(),
        "device": str(run.device),
        "fused": not cfg.reference,
        "parameters": run.nparams,
        "torch": torch.__version__,
        "train_config": cfg.to_dict(),
        "corpus": run.data.corpus,
        "samples": [{"word": s.word, "in_train": s.in_train} for s in samples],
    }
    if run.budget is not None:
        doc["time_budget"] = run.budget
    if diverged is not None:
        doc["diverged"] = diverged
    return doc


def _end_diverged(run: _Run, at: int, loss: float | None, what: str, reports: dict | None = None):
    """Leave a consistent run directory, then raise TrainingDiverged: the metrics so
    far, a checkpoint of the diverged state at ``run.step`` (the last good one kept under
    its step's name) and results.json with the losses (maybe inf/nan) and where.
    ``reports``: the final evaluation, after the final checkpoint (rank 0 alone)."""
    checkpointed = reports is not None
    info = {"step": at, "loss": loss, "lr": run.last_lr, "what": what}
    kept = None
    main = run.d.is_main
    if main:
        run.files.flush()
        if not checkpointed:
            kept = _keep_last_good(run.run_dir, run.good_step)
            info["kept_checkpoint"] = None if kept is None else str(kept)
    if not checkpointed:
        _save_checkpoint(run, diverged=info)
    if main:
        run.files.close()
        atomic_write_json(run.run_dir / RESULTS_NAME, _results_doc(run, reports or _final_reports(run), [], info))
        run.say(f"wrote {run.run_dir / RESULTS_NAME} (diverged at step {at:,})")
    if not checkpointed:  # (checkpointed: rank 0 alone, after the loop)
        _barrier(run.d)  # rank 0 has written everything before any rank exits
    raise TrainingDiverged(at, loss, run.last_lr, run.run_dir, what, kept)


def _final_report(run: _Run) -> dict:
    """Rank 0, after the final checkpoint: evaluate every split, sample words, write
    ``results.json`` and ``samples.txt``, print the summary; return the results."""
    cfg = run.cfg
    t_eval = time.perf_counter()
    reports = _final_reports(run)
    if run.on_eval is not None:
        run.on_eval({"step": run.step, "train": reports["train"]["loss"], "dev": reports["dev"]["loss"],
                     "final": True, "train_time_s": run.train_time, "eval_time_s": run.eval_time,
                     "wall_time_s": t_eval - run.wall0})
    run.files.log_eval(run.step, reports["train"]["loss"], reports["dev"]["loss"])
    bad = [n for n, r in reports.items() if r["loss"] is not None and _diverged(r["loss"])]
    if bad:  # finite parameters can still overflow the logits
        _end_diverged(run, run.step, None, f"the final {', '.join(bad)} loss is not finite", reports)
    run.files.close()
    samples = sample_words(run.model, run.data.vocab, cfg.num_samples,
                           torch.Generator().manual_seed(cfg.seed + 10),
                           train_words=run.data.split.train)
    results = _results_doc(run, reports, samples)
    atomic_write_json(run.run_dir / RESULTS_NAME, results)
    atomic_write_text(run.run_dir / "samples.txt", "".join(s.word + "\n" for s in samples))
    _print_summary(run, reports, samples, results)
    return results


def _print_summary(run: _Run, reports: dict, samples: list, results: dict) -> None:
    cfg, say = run.cfg, run.say
    say("final losses (nats per character):")
    say(format_losses(reports))
    say(f"trained {run.step:,} steps in {run.train_time:.1f} s ({results['steps_per_s'] or 0:,.0f} steps/s); "
        f"wall time {results['wall_time_s']:.1f} s"
        + (f" (time budget {cfg.time_budget:g} s)" if cfg.time_budget is not None and not run.resumed else ""))
    if samples:
        say(f"samples (seed {cfg.seed + 10}; * = occurs in the training words):")
        say(format_samples(samples))
    say(f"wrote {run.run_dir / RESULTS_NAME}; next: charmlp sample {run.run_dir}, charmlp plot {run.run_dir}")
