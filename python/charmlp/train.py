"""Training: the lecture's loop, made reproducible, resumable and distributed.

:func:`train` runs ``charmlp train``. Its defaults are the makemore MLP lecture's final
model (block 3, embedding 10, hidden 200, 200,000 steps of batch 32, plain SGD at 0.1 then
0.01 from step 100,000, the notebook's parameter draws). On top of the lecture's loop:

* **Speed.** Minibatch indices are drawn for a chunk of steps at once
  (``torch.randint(0, n, (k, batch))`` gives exactly the numbers of ``k`` successive
  ``torch.randint(0, n, (batch,))`` calls, and a chunk is ~0.2 s of training). Plain SGD
  runs each chunk as one :meth:`MLPLanguageModel.sgd_steps` call: the ``mlp_sgd_steps`` op
  does the chunk's fused forward + backward + update steps back to back in C++, bitwise
  the steps a loop of :meth:`~MLPLanguageModel.sgd_step` calls would take, without a
  Python round trip per step. AdamW (and SGD with weight decay) runs the loop users
  write, ``logits, loss = model(x, y)``, ``opt.zero_grad()``, ``loss.backward()``,
  ``opt.step()`` with a fused ``torch.optim`` optimizer: on the fused model the forward is
  one op that also computes the gradients, and the backward only hands them over.
* **Reproducibility.** Parameters are drawn from ``torch.Generator().manual_seed(seed)``
  (the notebook's generator for the default seed 2147483647) and minibatches from a
  dedicated generator seeded from ``(seed, rank)``; nothing depends on global RNG state.
* **Resumability.** A checkpoint (see :mod:`charmlp.checkpoint`) holds every piece of state,
  so ``--resume`` continues bitwise identically on CPU. Ctrl-C or SIGTERM stops after the
  current step (plain SGD and fused AdamW: the current chunk of steps, ~0.2 s) and writes a
  checkpoint first.
* **Time budgets.** ``time_budget`` (``--time-budget SECONDS``) trains for a wall-clock
  budget instead of a step count: the step rate is measured on a throwaway copy of the
  training state for ~1 % of the budget (0.3-2 s), with the cost of an evaluation, a
  checkpoint and the final report, and the number of steps that fits is fixed before the
  first step (:func:`budget_steps`; under torchrun rank 0's count, broadcast). The schedule
  is laid over those steps, and the run is then exactly the ``steps=N`` run: the count is
  in its config and checkpoints, so a resumed run finishes the same N steps. A machine
  that slows down after the measurement (other processes) makes the run late rather than
  cut its schedule short.
* **One run, one directory, one writer.** The process that writes a run directory holds
  its :class:`~charmlp.checkpoint.RunLock` from before its first write to its end, so a
  second ``train`` or ``--resume`` on the same directory fails at once
  (:class:`~charmlp.checkpoint.RunDirInUse`) instead of mixing two runs' files. Default
  names (``runs/YYYYmmdd-HHMMSS-<random hex>``) are created exclusively, so runs started in
  the same second get different directories. A write that fails (read-only or full disk)
  is a :class:`~charmlp.checkpoint.WriteError` naming the path.
* **Divergence.** A minibatch loss that is not finite, or so large that its perplexity
  overflows a float (> 709.78 nats, where a uniform guess is ln(vocabulary size) ~ 3.3), or
  parameters that stopped being finite, end the run with :class:`TrainingDiverged`. The
  run directory stays consistent: the metrics up to that point, a checkpoint of the
  diverged state (the previous checkpoint is kept as ``checkpoint-step<N>.pt``) and a
  ``results.json`` whose ``diverged`` entry says where; its losses may be ``"inf"`` or
  ``"nan"``.
* **Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
  DistributedDataParallel (gloo on CPU, nccl on CUDA): every rank draws its own minibatches
  (its generator is seeded from its rank), gradients are averaged by DDP's all-reduce, and
  rank 0 alone evaluates, logs, holds the run directory's lock and writes checkpoints. DDP
  needs the autograd path (forward through the wrapped module, ``backward``,
  ``optimizer.step``), so plain SGD runs as ``torch.optim.SGD`` there instead of the fused
  ``sgd_step``. Ctrl-C or SIGTERM, on any rank, stops every rank at the same step: the
  ranks all-reduce a stop flag (with the divergence flag and the next chunk length) at
  each chunk boundary, then rank 0 writes the checkpoint. Every collective has a timeout,
  :data:`DIST_TIMEOUT_ENV` (``CHARMLP_DIST_TIMEOUT``, seconds, default
  :data:`DIST_TIMEOUT_DEFAULT_S` = 60): a rank that died or was stopped ends the others
  within that time instead of gloo's 30 minutes. Rank 0's evaluations, checkpoint writes
  and final report run while the others wait in a collective, so a model whose evaluation
  takes longer than that needs a larger value.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from . import ops
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunLock,
    WriteError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    verify_file,
)
from .data import Corpus, Split, Vocab, build_examples, load_corpus, split_words
from .model import NOTEBOOK_SEED, MLPLanguageModel
from .sample import format_samples, sample_words

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainingInterrupted",
    "TrainingDiverged",
    "PeerLost",
    "DIST_TIMEOUT_ENV",
    "DIST_TIMEOUT_DEFAULT_S",
    "SEED_LIMIT",
    "train",
    "evaluate",
    "learning_rate",
    "batch_seed",
    "draw_batches",
    "loss_report",
    "lr_find",
    "resume_config",
    "RESUME_MUTABLE",
    "PRESETS",
    "preset_config",
    "budget_steps",
]

#: Default (initial, final) learning rates per optimizer. SGD: the lecture's 0.1 -> 0.01.
LR_DEFAULTS = {"sgd": (0.1, 0.01), "adamw": (0.01, 0.001)}
#: AdamW's decoupled weight decay when none is given (torch's default); SGD: none.
WD_DEFAULTS = {"sgd": 0.0, "adamw": 0.01}
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
#: Settings that ``--resume`` may change: they do not alter what the run computes (steps
#: only extends or shortens it; the schedule is recomputed for the new total).
RESUME_MUTABLE = frozenset({"steps", "threads", "device", "reference", "eval_every",
                            "checkpoint_every", "eval_batch_size", "num_samples"})
METRICS_NAME = "metrics.csv"
EVALS_NAME = "evals.csv"
RESULTS_NAME = "results.json"
#: Seeds are 0 <= seed < 2**63: torch.Generator.manual_seed takes a signed 64-bit value.
SEED_LIMIT = 2**63
#: Environment variable: seconds a torchrun rank waits in a collective for the others
#: before the job fails (a dead or stopped peer).
DIST_TIMEOUT_ENV = "CHARMLP_DIST_TIMEOUT"
DIST_TIMEOUT_DEFAULT_S = 60.0
#: Largest loss whose perplexity exp(loss) is a finite float; a run beyond it diverged.
MAX_LOSS = math.log(sys.float_info.max)


#: ``--time-budget``: the share of the budget spent measuring the step rate before the
#: step count is fixed, and its bounds in seconds (the measurement counts in the budget).
BUDGET_PROBE_SHARE = 0.01
BUDGET_PROBE_MIN_S, BUDGET_PROBE_MAX_S = 0.3, 2.0

#: Named recipes for ``--preset`` (``charmlp train --preset NAME``): settings that replace
#: the defaults; explicit flags still win. ``lecture`` is the default model itself.
#: ``best-5min`` is the best model found in 5 minutes of 2 CPU cores on names.txt's lecture
#: split, tuned on the dev split alone (scripts/sweep_preset.py and its table in
#: benchmarks/results/cpu/preset_sweep.md): the Bengio et al. model (embedding, one tanh
#: hidden layer, softmax), AdamW with decoupled weight decay on a cosine schedule laid over
#: a 300 s budget.
PRESETS: dict[str, dict] = {
    "lecture": {},
    "best-5min": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, optimizer="adamw",
                      lr_schedule="cosine", lr=2e-3, lr_final=1e-5, weight_decay=0.1,
                      init="default", time_budget=300.0),
}


class ConfigError(ValueError):
    """An invalid combination of training settings."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C/SIGTERM after writing a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"interrupted at step {step:,}; checkpoint written to {run_dir}. "
                         f"Continue with: charmlp train --resume {run_dir}")
        self.step, self.run_dir = step, run_dir


class PeerLost(RuntimeError):
    """Under torchrun: another rank died, stopped, or did not answer within the timeout."""


class TrainingDiverged(FloatingPointError):
    """The loss or the parameters stopped being finite at ``step`` (0-based; ``loss`` is
    its minibatch loss, None when only the parameters or another rank's loss show it).
    The run directory holds the diverged state's checkpoint and results."""

    def __init__(self, step: int, loss: float | None, lr: float, run_dir: Path | None,
                 what: str = "loss", kept: Path | None = None):
        found = f"loss {loss:.4g}" if loss is not None else what
        super().__init__(f"training diverged at step {step:,} ({found}): the learning rate "
                         f"{lr:g} is too high for this model; lower --lr"
                         + (f" (the last good checkpoint is kept as {kept})" if kept else ""))
        self.step, self.loss, self.lr, self.run_dir, self.kept = step, loss, lr, run_dir, kept


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in ``config.json`` and checkpoints)."""

    data: str | None = None          # word list; None = the embedded corpus
    lowercase: bool = True           # see charmlp.data's character policy
    block_size: int = 3
    emb_dim: int = 10
    hidden: int = 200
    steps: int = 200_000             # with time_budget: fixed by the budget's estimate
    time_budget: float | None = None  # seconds of wall time for the whole run (see budget_steps)
    batch_size: int = 32
    optimizer: str = "sgd"
    lr_schedule: str = "step"
    lr: float | None = None          # None: LR_DEFAULTS[optimizer][0]
    lr_final: float | None = None    # None: LR_DEFAULTS[optimizer][1]
    weight_decay: float | None = None  # None: WD_DEFAULTS[optimizer]
    seed: int = NOTEBOOK_SEED
    init: str = "notebook"
    reference: bool = False          # plain PyTorch ops instead of the fused ones
    device: str = "cpu"
    threads: int | None = None
    split_seed: int = 42
    test_count: int | None = None    # None: the lecture's 80/10/10
    dev_count: int | None = None
    eval_every: int = 20_000         # full train + dev loss; 0: only at the end
    checkpoint_every: int = 10_000   # 0: only at the end
    eval_batch_size: int = 65_536
    num_samples: int = 10
    preset: str | None = None        # the --preset the settings started from (a record)

    def resolved(self) -> "TrainConfig":
        """A copy with the optimizer-dependent defaults filled in, validated."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        lr0, lr1 = LR_DEFAULTS[self.optimizer]
        c = dataclasses.replace(
            self,
            lr=lr0 if self.lr is None else float(self.lr),
            lr_final=lr1 if self.lr_final is None else float(self.lr_final),
            weight_decay=WD_DEFAULTS[self.optimizer] if self.weight_decay is None else float(self.weight_decay),
        )
        c.validate()
        return c

    def validate(self) -> None:
        for name in ("block_size", "emb_dim", "hidden", "steps", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("eval_every", "checkpoint_every", "num_samples", "seed", "split_seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.seed >= SEED_LIMIT:  # (torch generators take a signed 64-bit seed)
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr-schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.init not in ("notebook", "default"):
            raise ConfigError(f"init must be 'notebook' or 'default', got {self.init!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.lr_final is not None and not (self.lr_final >= 0 and math.isfinite(self.lr_final)):
            raise ConfigError(f"lr-final must be a number >= 0, got {self.lr_final}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.dev_count is not None and self.test_count is None:
            raise ConfigError("--dev-count needs --test-count (the lecture split is 80/10/10)")
        if self.time_budget is not None:
            b = self.time_budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0 and math.isfinite(b)):
                raise ConfigError(f"time-budget must be a number of seconds > 0, got {b!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training settings {sorted(unknown)} (written by a newer charmlp?)")
        return cls(**d)


def preset_config(name: str, **overrides) -> TrainConfig:
    """The config of preset ``name`` (see :data:`PRESETS`) with ``overrides`` on top.

    ``steps`` and ``time_budget`` both set the run's length: an explicit ``steps``
    replaces the preset's time budget, and giving both is a :class:`ConfigError`.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    _check_length(overrides)
    settings = dict(PRESETS[name])
    if "steps" in overrides:
        settings.pop("time_budget", None)
    settings.update(overrides)
    return TrainConfig(**settings, preset=name)


def _check_length(given: dict) -> None:
    if given.get("steps") is not None and given.get("time_budget") is not None:
        raise ConfigError("--time-budget fixes the number of steps itself; give --time-budget "
                          "or --steps, not both")


def resume_config(saved: dict, overrides: dict) -> TrainConfig:
    """The saved config of a run with the allowed ``overrides`` applied.

    Settings outside :data:`RESUME_MUTABLE` define the computation (data, model, optimizer,
    seeds); changing them would not continue the same run, so a differing value is an
    error rather than silently ignored.
    """
    cfg = TrainConfig.from_dict(saved)
    changes = {}
    for key, value in overrides.items():
        if value == getattr(cfg, key):
            continue
        if key not in RESUME_MUTABLE:
            raise ConfigError(f"--{key.replace('_', '-')} {value} differs from the run's "
                              f"{getattr(cfg, key)!r}; a resumed run keeps its data, model, optimizer "
                              f"and seeds (only {', '.join(sorted(RESUME_MUTABLE))} may change)")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based ``step``.

    ``step``: ``lr`` for the first half, then ``lr_final`` (the lecture:
    ``lr = 0.1 if i < 100000 else 0.01``); ``cosine``: from ``lr`` down to ``lr_final``
    over the run; ``constant``: ``lr``.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr if step < cfg.steps // 2 else cfg.lr_final
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * step / cfg.steps))


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


def batch_seed(seed: int, rank: int) -> int:
    """Seed of a rank's minibatch generator: independent streams for each (seed, rank)."""
    state = np.random.SeedSequence([int(seed), 0x6D62, int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def draw_batches(generator: torch.Generator, n: int, steps: int, batch_size: int) -> torch.Tensor:
    """Minibatch row indices for ``steps`` steps, ``[steps, batch_size]``, like the notebook.

    One call equals ``steps`` successive ``torch.randint(0, n, (batch_size,))`` draws from
    the same generator (tested), so chunking never changes which rows a run sees.
    """
    return torch.randint(0, n, (steps, batch_size), generator=generator)


@torch.no_grad()
def evaluate(model: MLPLanguageModel, X: torch.Tensor, Y: torch.Tensor,
             batch_size: int = 65_536) -> float | None:
    """Mean cross-entropy (nats per character) over all of ``X, Y``; None when empty.

    Batched so memory stays bounded; the batch means are combined in float64.
    """
    n = X.shape[0]
    if n == 0:
        return None
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(X[i:i + batch_size], Y[i:i + batch_size], return_logits=False)
        total += float(loss.double()) * min(batch_size, n - i)
    return total / n


def loss_report(loss: float | None, examples: int) -> dict:
    """A loss in nats with its perplexity and bits per character.

    The perplexity of a loss above :data:`MAX_LOSS` (a diverged model) is ``inf``, where
    ``math.exp`` would raise OverflowError; a ``nan`` loss gives ``nan``.
    """
    if loss is None:
        return {"loss": None, "perplexity": None, "bits_per_char": None, "examples": examples}
    perplexity = math.exp(loss) if loss <= MAX_LOSS else (math.inf if loss > MAX_LOSS else math.nan)
    return {"loss": loss, "perplexity": perplexity, "bits_per_char": loss / math.log(2),
            "examples": examples}


def _diverged(loss: float) -> bool:
    """A loss that is not finite, or whose perplexity is not (see :data:`MAX_LOSS`)."""
    return not loss <= MAX_LOSS  # (also true for nan)


def format_losses(reports: dict[str, dict]) -> str:
    lines = [f"  {'split':<6} {'loss':>8} {'perplexity':>11} {'bits/char':>10} {'examples':>10}"]
    for name, r in reports.items():
        if r["loss"] is None:
            lines.append(f"  {name:<6} {'n/a':>8} {'':>11} {'':>10} {r['examples']:>10,}")
        else:
            lines.append(f"  {name:<6} {r['loss']:>8.4f} {r['perplexity']:>11.3f} "
                         f"{r['bits_per_char']:>10.4f} {r['examples']:>10,}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialized the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist_timeout() -> datetime.timedelta:
    """The collectives' timeout: ``$CHARMLP_DIST_TIMEOUT`` seconds, default 60.

    torch's default (30 minutes for gloo) is how long a rank waits for a dead or stopped
    peer; a minute is far more than any wait of a healthy run (rank 0's evaluations and
    checkpoint writes, ~1 s at the lecture's size) and short enough to free the machines.
    """
    text = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DIST_TIMEOUT_DEFAULT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{DIST_TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def _env_rank() -> int:
    """This process's rank, known before the process group exists (torchrun sets RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _setup_distributed(device: str) -> _Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (or reuse an existing one)."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    timeout = _dist_timeout()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    return _Dist(rank, world, local_rank, owns_group=True)


def _agree(d: _Dist, stop: bool, bad_step: float, chunk: int) -> tuple[bool, float, int]:
    """What every rank does after a chunk, agreed: stop if any rank was signalled, the
    earliest diverged step of any rank (``inf``: none), the smallest proposed chunk length.

    Under DDP every rank must stop at the same step (a rank that left early would leave
    the others waiting in the next step's gradient all-reduce) and take the same chunks
    (this all-reduce must meet the others' at the same step). One MAX all-reduce of
    ``(stop, -bad_step, -chunk)``.
    """
    if not d.enabled:
        return stop, bad_step, chunk
    t = torch.tensor([float(stop), -bad_step, -float(chunk)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    a, b, c = t.cpu().tolist()
    return a > 0, -b, int(-c)


def _teardown_distributed(d: _Dist) -> None:
    """Barrier, then destroy the group: no rank leaves while another still talks to it."""
    if d.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- progress / logs


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A plain-text progress line on stderr: step, mean loss, lr, steps/s, ETA.

    On a terminal the line is redrawn in place (at most 5 times a second); otherwise
    (logs, CI) a line is printed every 10 % of the run or every 30 s.
    """

    def __init__(self, total: int, start: int, stream=None, enabled: bool = True,
                 start_time: float = 0.0):
        self.total, self.start = total, start
        self.start_time = start_time  # training time already spent before `start` (resume)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.last_step = start
        self.losses: list[float] = []
        self.drawn = False

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
        line = (f"step {step:>{len(f'{self.total:,}')},}/{self.total:,} {100 * step / self.total:5.1f}% | "
                f"loss {sum(self.losses) / len(self.losses):.4f} | lr {lr:.3g} | "
                f"{rate:,.0f} steps/s | ETA {_hms(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.losses.clear()
        self.last, self.last_step = now, step

    def clear(self) -> None:
        """End the in-place line so other output starts on a fresh line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


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


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into "stop after this step and checkpoint".

    Single process: a second Ctrl-C raises KeyboardInterrupt at once. Under torchrun
    (``distributed``) the handler stays for every further signal: torchrun forwards a
    terminal's Ctrl-C to workers that the terminal already signalled, and that second
    SIGINT must not abort the checkpoint; the ranks agree on the stop step at the next
    chunk boundary (:func:`_agree`), and torchrun's own ``--shutdown-timeout`` (30 s) is
    the hard stop. Only installed in the main thread (signals are delivered there).
    """

    def __init__(self, enabled: bool, notify: Callable[[str], None], distributed: bool = False):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.notify = notify
        self.distributed = distributed
        self.previous: dict = {}

    def _handler(self, signum, frame):
        first = not self.requested
        self.requested = True
        if self.distributed:
            if first:
                self.notify(f"\n{signal.Signals(signum).name}: stopping every rank at the end of "
                            f"the current chunk of steps and writing a checkpoint")
            return
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}
        self.notify(f"\n{signal.Signals(signum).name}: stopping after the current step(s) and writing a "
                    f"checkpoint (press Ctrl-C again to abort at once)")

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}
        return False


# --------------------------------------------------------------------------- RNG state


def _rng_state(batch_states: list[torch.Tensor]) -> dict:
    np_state = np.random.get_state()
    return {
        "batch": batch_states,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def _restore_global_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))


# --------------------------------------------------------------------------- the run


@dataclass
class _Data:
    corpus: dict
    vocab: Vocab
    split: Split
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _load_split(cfg: TrainConfig, log) -> tuple[Corpus, Vocab, Split]:
    """cfg.data's corpus, its vocabulary and the train/dev/test split of its words."""
    corpus = load_corpus(cfg.data, cfg.lowercase, warn=log)
    log(f"corpus: {corpus.describe()}")
    vocab = Vocab.from_words(corpus.words)
    try:
        split = split_words(corpus.words, cfg.split_seed, cfg.test_count, cfg.dev_count)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return corpus, vocab, split


def _prepare_data(cfg: TrainConfig, ckpt: dict | None, log) -> _Data:
    if ckpt is not None:
        corpus_info = ckpt["corpus"]
        vocab = Vocab.from_dict(ckpt["vocab"])
        split = Split.from_dict(ckpt["split"])
        log(f"corpus: {corpus_info.get('path') or corpus_info.get('name')}: "
            f"{corpus_info.get('num_words', 0):,} words (from the checkpoint)")
    else:
        corpus, vocab, split = _load_split(cfg, log)
        corpus_info = corpus.to_dict()
    tensors = {name: build_examples(words, vocab, cfg.block_size, source=name)
               for name, words in split.parts().items()}
    if tensors["train"][0].shape[0] == 0:
        raise ConfigError("the training split is empty: the corpus is too small for this split")
    log(f"vocabulary: {vocab.size} symbols {''.join(vocab.itos)!r}")
    log(f"{split.describe()}; examples: "
        + " / ".join(f"{t[0].shape[0]:,}" for t in tensors.values()))
    return _Data(corpus_info, vocab, split, tensors)


def _check_device(cfg: TrainConfig) -> None:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this torch sees no CUDA device "
                              f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if not cfg.reference:
            from . import has_cuda_kernels

            if not has_cuda_kernels():
                raise ConfigError("--device cuda: this charmlp build has no CUDA kernels; "
                                  "rebuild with a CUDA torch and nvcc, or add --reference")


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


def _build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> MLPLanguageModel:
    # init="default" draws from the global RNG (nn.init), "notebook" from its own generator.
    torch.manual_seed(cfg.seed)
    model = MLPLanguageModel(vocab_size=vocab_size, block_size=cfg.block_size,
                             emb_dim=cfg.emb_dim, hidden=cfg.hidden, fused=not cfg.reference,
                             init=cfg.init, generator=torch.Generator().manual_seed(cfg.seed))
    return model.to(device)


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
    :func:`_measure_budget`), and the run is then exactly the ``steps=N`` run, schedule,
    checkpoints and resume included (a resumed run finishes the same N steps). The budget
    counts from this call to the final report (evaluations, checkpoints, samples included).

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
        cfg = resume_config(ckpt["train_config"], overrides or {})
    cfg = cfg.resolved()
    if resume is None:
        run_dir, default_name = _new_run_dir(out)
    _check_device(cfg)
    d = _setup_distributed(cfg.device)
    try:
        results = _train(cfg, run_dir, default_name, ckpt, d, own, progress, log,
                         progress_stream, wall0, on_eval)
    except BaseException as e:
        # No barrier here: the other ranks may be blocked in a collective this rank will never
        # join. Leave the group and let the exception end the process; torchrun then stops
        # the other workers instead of everyone waiting for the collective timeout.
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if d.enabled and _is_peer_failure(e):
            raise PeerLost(f"rank {d.rank}: lost contact with another rank ({_first_line(e)}); it "
                           f"died or was stopped (a collective waits at most "
                           f"{_dist_timeout().total_seconds():g} s, ${DIST_TIMEOUT_ENV})") from None
        raise
    _teardown_distributed(d)
    return results


#: Fragments of the errors gloo and nccl raise when a peer is gone or silent. Only the
#: message depends on recognizing them: the job ends either way.
_PEER_FAILURE_TEXT = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                      "Broken pipe", "NCCL communicator was aborted", "Socket Timeout")


def _is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, (CheckpointError, WriteError)) or not isinstance(e, RuntimeError):
        return False
    return isinstance(e, dist.DistError) or any(t in str(e) for t in _PEER_FAILURE_TEXT)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("] ", 1)[-1] if text.startswith("[") else text  # (drop gloo's source path)


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


def _measure_budget(cfg: TrainConfig, model: MLPLanguageModel, net, fast_sgd: bool, Xtr, Ytr,
                    data: _Data, d: _Dist, device: torch.device, wall0: float, run_dir: Path) -> dict:
    """``--time-budget``: fix the number of steps so that the whole run, from :func:`train`'s
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
    budget = float(cfg.time_budget)
    probe_s = min(BUDGET_PROBE_MAX_S, max(BUDGET_PROBE_MIN_S, BUDGET_PROBE_SHARE * budget))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = None
    if not fast_sgd:
        optim = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
        opt = optim(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # Its own minibatch stream (torch.randint, as draw_batches draws): the run's generator
    # is not touched.
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, d.rank) ^ 0x5EED)
    on_cpu = device.type == "cpu"
    ntr = Xtr.shape[0]

    def chunk(k: int) -> None:
        ix = torch.randint(0, ntr, (k, cfg.batch_size), generator=gen).to(device, non_blocking=True)
        xs, ys = Xtr[ix], Ytr[ix]
        lrs = [learning_rate(cfg, j) for j in range(k)]
        if fast_sgd:
            losses = model.sgd_steps(xs, ys, lrs).tolist()
        else:
            losses = []
            for j in range(k):
                for group in opt.param_groups:
                    group["lr"] = lrs[j]
                _, loss = net(xs[j], ys[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()) if on_cpu else loss.detach())
            if not on_cpu:
                losses = torch.stack(losses).tolist()
        if not on_cpu:
            torch.cuda.synchronize(device)
        "".join(f"{j},{lr:.6g},{x:.6f}\n" for j, (lr, x) in enumerate(zip(lrs, losses)))  # (the rows' cost)
        all(bool(torch.isfinite(p).all()) for p in model.parameters())

    model.train()
    t_start = time.perf_counter()
    chunk(16)  # warm-up: first-call costs (allocations, threads, the optimizer's state)
    t0 = time.perf_counter()
    chunk(64)
    warm = 64 + 16
    rate = 64 / max(time.perf_counter() - t0, 1e-9)
    steps, spent = 0, 0.0
    k = int(min(2000, max(16, rate * 0.1)))
    _, _, k = _agree(d, False, math.inf, k)  # (under DDP every rank takes the same chunks)
    while True:
        t0 = time.perf_counter()
        chunk(k)
        dt = time.perf_counter() - t0
        steps, spent = steps + k, spent + dt
        rate = steps / spent if spent > 0 else 1e6
        left = probe_s - (time.perf_counter() - t_start)
        k = int(min(2000, max(16, rate * min(0.1, max(left, 0.0)))))
        done, _, k = _agree(d, left <= 0, math.inf, k)
        if done:
            break
    probe_elapsed = time.perf_counter() - t_start
    step_s = spent / steps
    with torch.no_grad():
        model.load_state_dict(saved)
    for p in model.parameters():
        p.grad = None

    info = None
    if d.is_main:
        model.eval()
        X, Y = data.tensors["dev"]
        if X.shape[0] < 1000:
            X, Y = data.tensors["train"]
        X, Y = X[:50_000].to(device), Y[:50_000].to(device)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            evaluate(model, X, Y, cfg.eval_batch_size)
            times.append(time.perf_counter() - t0)
        per_row = min(times) / X.shape[0]
        rows = {name: t[0].shape[0] for name, t in data.tensors.items()}
        eval_s = per_row * (rows["train"] + rows["dev"])
        # A checkpoint's size and writing (temp file, fsync, verify, rename), twice: the best.
        state = {"model": model.state_dict(), "optimizer": opt.state_dict() if opt is not None else None,
                 "split": data.split.to_dict(), "corpus": data.corpus, "vocab": data.vocab.to_dict()}
        probe_file = run_dir / ".budget-probe.pt"
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            atomic_write(probe_file, lambda f: torch.save(state, f), verify=verify_file)
            times.append(time.perf_counter() - t0)
        probe_file.unlink(missing_ok=True)
        checkpoint_s = min(times)
        t0 = time.perf_counter()
        sample_words(model, data.vocab, cfg.num_samples, torch.Generator().manual_seed(0),
                     train_words=data.split.train)
        final_s = (time.perf_counter() - t0 + checkpoint_s + per_row * sum(rows.values()) + 0.02)
        model.train()
        setup_s = time.perf_counter() - wall0
        n = budget_steps(budget - setup_s - final_s, step_s, cfg.eval_every, eval_s,
                         cfg.checkpoint_every, checkpoint_s)
        info = {"budget_s": budget, "steps": n, "steps_per_s": 1.0 / step_s,
                "probe_s": probe_elapsed, "probe_steps": steps + warm, "setup_s": setup_s,
                "eval_s": eval_s, "evaluations": _every_count(cfg.eval_every, n),
                "checkpoint_s": checkpoint_s, "checkpoints": _every_count(cfg.checkpoint_every, n),
                "final_s": final_s}
    del opt
    if d.enabled:
        box = [info]
        dist.broadcast_object_list(box, src=0)
        info = box[0]
    if info["steps"] < 1:
        raise ConfigError(f"--time-budget {budget:g} s leaves no time to train: loading the data and "
                          f"measuring the speed took {info['setup_s']:.1f} s and the final evaluation "
                          f"needs ~{info['final_s']:.1f} s; give a larger budget")
    return info


def _train(cfg, run_dir: Path, default_name: bool, ckpt, d: _Dist, own: _Ownership, progress, log,
           progress_stream, wall0, on_eval=None) -> dict:
    main = d.is_main
    say = (log or (lambda s: print(s, flush=True))) if main else (lambda s: None)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda", d.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if ckpt is not None and ckpt["world_size"] != d.world_size:
        raise CheckpointError(f"{run_dir}: the run was trained with {ckpt['world_size']} process(es); "
                              f"resume it with the same number (now {d.world_size})")
    if ckpt is not None and d.enabled:
        # Each rank read the checkpoint itself: all must have read the same one.
        steps = [None] * d.world_size
        dist.all_gather_object(steps, ckpt["step"])
        if len(set(steps)) > 1:
            raise CheckpointError(f"{run_dir}: the ranks read different checkpoints (steps {steps}); "
                                  f"was another process writing it? Resume again")
    say(f"run directory: {run_dir}" + (f" (resuming at step {ckpt['step']:,})" if ckpt else ""))
    data = _prepare_data(cfg, ckpt, say)
    if main and ckpt is None:  # only once the data is known to be good, so a bad --data leaves no empty run
        run_dir = _create_run_dir(run_dir, default_name, say)
        own.take(run_dir, fresh=True)  # before anything is written there
    if d.enabled:  # rank 0's directory (each rank drew its own default name) in every rank's messages
        name = [str(run_dir)]
        dist.broadcast_object_list(name, src=0)
        run_dir = Path(name[0])
    Xtr, Ytr = (t.to(device) for t in data.tensors["train"])
    model = _build_model(cfg, data.vocab.size, device)
    nparams = sum(p.numel() for p in model.parameters())
    fast_sgd = cfg.optimizer == "sgd" and cfg.weight_decay == 0 and not d.enabled
    path = ("fused charmlp ops" if not cfg.reference else "plain PyTorch ops (--reference)")
    say(f"model: block {cfg.block_size}, emb {cfg.emb_dim}, hidden {cfg.hidden}, "
        f"{nparams:,} parameters, {cfg.init} init; {path} on {device}, "
        f"{torch.get_num_threads()} thread(s)" + (f", {d.world_size} DDP processes" if d.enabled else ""))

    opt = None
    if not fast_sgd:
        # fused: one kernel for all parameters (CPU and CUDA); on CPU at the lecture's size
        # AdamW.step is ~60 us fused against ~180 us for the default per-tensor loop.
        optim = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
        opt = optim(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    net = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, d.rank))

    budget = None
    if ckpt is not None:
        budget = ckpt.get("budget")
    elif cfg.time_budget is not None:
        budget = _measure_budget(cfg, model, net, fast_sgd, Xtr, Ytr, data, d, device, wall0, run_dir)
        cfg = dataclasses.replace(cfg, steps=budget["steps"])
        say(f"time budget {cfg.time_budget:g} s: {budget['steps_per_s']:,.0f} steps/s over "
            f"{budget['probe_s']:.1f} s (on a throwaway copy of the state), an evaluation ~"
            f"{budget['eval_s']:.2f} s, the final report ~{budget['final_s']:.2f} s: "
            f"{cfg.steps:,} steps, the {cfg.lr_schedule} schedule laid over them")

    step, train_time = 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"]["state_dict"])
            if opt is not None:
                if ckpt["optimizer"].get("state") is None:
                    raise ValueError("the checkpoint has no optimizer state for "
                                     f"{cfg.optimizer}")
                opt.load_state_dict(ckpt["optimizer"]["state"])
            gen.set_state(ckpt["rng"]["batch"][d.rank])
            _restore_global_rng(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{run_dir}: incompatible checkpoint: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        step, train_time = ckpt["step"], ckpt["train_time_s"]
        if step > cfg.steps:
            raise ConfigError(f"the run is already at step {step:,}, beyond --steps {cfg.steps:,}")

    good_step = None if ckpt is None else ckpt["step"]  # of the last checkpoint written

    def checkpoint(at_step: int, diverged: dict | None = None) -> None:
        nonlocal good_step
        states = [gen.get_state()]
        if d.enabled:
            states = [None] * d.world_size
            dist.all_gather_object(states, gen.get_state())
        if main:
            extra = {} if diverged is None else {"diverged": diverged}  # (resume refuses it)
            if budget is not None:
                extra["budget"] = budget
            save_checkpoint(run_dir / CHECKPOINT_NAME, {**extra,
                "step": at_step,
                "model": {"config": model.config(),
                          "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
                "optimizer": {"name": cfg.optimizer, "state": opt.state_dict() if opt is not None else None},
                "rng": _rng_state([s.cpu() for s in states]),
                "train_config": cfg.to_dict(),
                "vocab": data.vocab.to_dict(),
                "split": data.split.to_dict(),
                "corpus": data.corpus,
                "world_size": d.world_size,
                "train_time_s": float(train_time),
            })
        if diverged is None:
            good_step = at_step
        if d.enabled:  # no rank leaves (it may exit next) before rank 0 has written it
            dist.barrier()

    if main:
        config_doc = {"train_config": cfg.to_dict(), "model": model.config(), "parameters": nparams,
                      "corpus": data.corpus, "vocab": data.vocab.to_dict(), "world_size": d.world_size}
        if budget is not None:
            config_doc["time_budget"] = budget
        atomic_write_json(run_dir / "config.json", config_doc)
        atomic_write_json(run_dir / "split.json", data.split.to_dict())
        files = _RunFiles(run_dir, step)
    bar = Progress(cfg.steps, step, progress_stream, enabled=progress and main, start_time=train_time)

    def step_fn(xb, yb, lr):
        # The loop users write: on the fused model, model(x, y) is one op computing the
        # logits, the loss and the gradients, and backward() hands them over. Under DDP
        # (net wraps the model) its hooks all-reduce the gradients as AccumulateGrad sets them.
        for group in opt.param_groups:
            group["lr"] = lr
        logits, loss = net(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    how = ("" if cfg.reference else
           " (fused steps, a chunk per op call)" if fast_sgd
           else " (the fused model's one-op forward and backward, then fused torch.optim)")
    say(f"training: {cfg.steps:,} steps of batch {cfg.batch_size}"
        + (" per process" if d.enabled else "")
        + f", {cfg.optimizer}{how}, lr {cfg.lr_schedule} "
        f"{cfg.lr:g}" + (f" -> {cfg.lr_final:g}" if cfg.lr_schedule != "constant" else "")
        + (f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else ""))
    on_cpu = device.type == "cpu"
    ntr = Xtr.shape[0]
    chunk = 64
    last_lr = learning_rate(cfg, step)

    def due(every: int, s: int) -> bool:
        return every > 0 and s % every == 0 and s < cfg.steps

    def next_stop(s: int) -> int:
        stop = min(cfg.steps, s + chunk)
        for every in (cfg.eval_every, cfg.checkpoint_every):
            if every > 0:
                stop = min(stop, (s // every + 1) * every)
        return stop

    def final_reports() -> dict:
        model.eval()
        return {name: loss_report(evaluate(model, X.to(device), Y.to(device), cfg.eval_batch_size),
                                  X.shape[0])
                for name, (X, Y) in data.tensors.items()}

    def results_doc(reports: dict, samples: list, diverged: dict | None = None) -> dict:
        doc = {
            "run_dir": str(run_dir),
            "steps": step,
            "losses": reports,
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - wall0,
            "steps_per_s": step / train_time if train_time > 0 else None,
            "examples_per_s": step * cfg.batch_size * d.world_size / train_time if train_time > 0 else None,
            "world_size": d.world_size,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "fused": not cfg.reference,
            "parameters": nparams,
            "torch": torch.__version__,
            "train_config": cfg.to_dict(),
            "corpus": data.corpus,
            "samples": [{"word": s.word, "in_train": s.in_train} for s in samples],
        }
        if budget is not None:
            doc["time_budget"] = budget
        if diverged is not None:
            doc["diverged"] = diverged
        return doc

    def end_diverged(at: int, loss: float | None, what: str, reports: dict | None = None):
        """Leave a consistent run directory, then raise TrainingDiverged: the metrics so
        far, a checkpoint of the diverged state at ``step`` (the last good one kept under
        its step's name) and results.json with the losses (maybe inf/nan) and where.
        ``reports``: the final evaluation, after the final checkpoint (rank 0 alone)."""
        checkpointed = reports is not None
        info = {"step": at, "loss": loss, "lr": last_lr, "what": what}
        kept = None
        if main:
            files.flush()
            if not checkpointed:
                kept = _keep_last_good(run_dir, good_step)
                info["kept_checkpoint"] = None if kept is None else str(kept)
        if not checkpointed:
            checkpoint(step, diverged=info)
        if main:
            files.close()
            atomic_write_json(run_dir / RESULTS_NAME, results_doc(reports or final_reports(), [], info))
            say(f"wrote {run_dir / RESULTS_NAME} (diverged at step {at:,})")
        if d.enabled and not checkpointed:  # (checkpointed: rank 0 alone, after the loop)
            dist.barrier()  # rank 0 has written everything before any rank exits
        raise TrainingDiverged(at, loss, last_lr, run_dir, what, kept)

    eval_time = 0.0  # seconds in periodic evaluations (for on_eval)
    model.train()
    with _StopRequest(enabled=True, notify=lambda m: (bar.clear(), say(m)),
                      distributed=d.enabled) as stop:
        while step < cfg.steps:
            end = next_stop(step)
            k = end - step
            state0 = gen.get_state()
            ix = draw_batches(gen, ntr, k, cfg.batch_size).to(device, non_blocking=True)
            xs, ys = Xtr[ix], Ytr[ix]
            lrs, losses = [], []
            t0 = time.perf_counter()
            done = k
            if fast_sgd:
                # The whole chunk in one op (mlp_sgd_steps: the same steps as sgd_step,
                # bitwise, without a Python round trip each); a stop request is seen between
                # chunks (~0.2 s).
                if stop.requested:
                    done = 0
                else:
                    lrs = [learning_rate(cfg, step + j) for j in range(k)]
                    losses = model.sgd_steps(xs, ys, lrs).tolist()
            else:
                for j in range(k):
                    if stop.requested and not d.enabled:  # (under DDP: at the chunk's end, agreed)
                        done = j
                        break
                    lr = learning_rate(cfg, step + j)
                    loss = step_fn(xs[j], ys[j], lr)
                    losses.append(float(loss) if on_cpu else loss)
                    lrs.append(lr)
                if not on_cpu:
                    losses = torch.stack(losses).tolist() if losses else []
            if not on_cpu:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            if done < k:  # rewind the generator to exactly `done` draws
                gen.set_state(state0)
                draw_batches(gen, ntr, done, cfg.batch_size)
            if main:
                files.log_steps(step, lrs, losses)
            # Divergence: the first step whose loss diverged (see _diverged), or, when only
            # the parameters overflowed, the chunk's last update (each loss is computed
            # before its step's update).
            bad = next((i for i, x in enumerate(losses) if _diverged(x)), None)
            bad_step, bad_loss = (math.inf, None) if bad is None else (step + bad, losses[bad])
            step += done
            if lrs:
                last_lr = lrs[-1]
            if done:
                chunk = int(min(2000, max(16, done / max(elapsed, 1e-9) * 0.2)))
            bar.update(step, losses, last_lr, train_time)
            if bad is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                bad_step = step - 1
            local_bad = bad_step
            stop_now, bad_step, chunk = _agree(d, stop.requested, bad_step, chunk)
            if bad_step < math.inf:
                bar.clear()
                what = ("loss" if bad is not None and bad_step == local_bad
                        else "parameters are no longer finite" if bad_step == local_bad
                        else "a diverged loss on another rank")
                end_diverged(int(bad_step), bad_loss if bad_step == local_bad else None, what)
            if stop_now:
                bar.clear()
                if main:
                    files.flush()
                checkpoint(step)
                raise TrainingInterrupted(step, run_dir)
            if due(cfg.eval_every, step):
                if main:
                    t_eval = time.perf_counter()
                    model.eval()
                    tr = evaluate(model, Xtr, Ytr, cfg.eval_batch_size)
                    dev = evaluate(model, *(t.to(device) for t in data.tensors["dev"]), cfg.eval_batch_size)
                    model.train()
                    if on_eval is not None:
                        on_eval({"step": step, "train": tr, "dev": dev, "final": False,
                                 "train_time_s": train_time, "eval_time_s": eval_time,
                                 "wall_time_s": t_eval - wall0})
                    eval_time += time.perf_counter() - t_eval
                    files.log_eval(step, tr, dev)
                    bar.clear()
                    say(f"step {step:,}: train {tr:.4f}  dev " + ("n/a" if dev is None else f"{dev:.4f}"))
            if due(cfg.checkpoint_every, step):
                if main:
                    files.flush()
                checkpoint(step)
    bar.update(step, [], last_lr, train_time, force=True)
    bar.clear()
    if main:
        files.flush()
    checkpoint(step)

    results = None
    if main:
        t_eval = time.perf_counter()
        reports = final_reports()
        if on_eval is not None:
            on_eval({"step": step, "train": reports["train"]["loss"], "dev": reports["dev"]["loss"],
                     "final": True, "train_time_s": train_time, "eval_time_s": eval_time,
                     "wall_time_s": t_eval - wall0})
        files.log_eval(step, reports["train"]["loss"], reports["dev"]["loss"])
        bad = [n for n, r in reports.items() if r["loss"] is not None and _diverged(r["loss"])]
        if bad:  # finite parameters can still overflow the logits
            end_diverged(step, None, f"the final {', '.join(bad)} loss is not finite", reports)
        files.close()
        samples = sample_words(model, data.vocab, cfg.num_samples,
                               torch.Generator().manual_seed(cfg.seed + 10),
                               train_words=data.split.train)
        results = results_doc(reports, samples)
        wall = results["wall_time_s"]
        atomic_write_json(run_dir / RESULTS_NAME, results)
        atomic_write_text(run_dir / "samples.txt", "".join(s.word + "\n" for s in samples))
        say("final losses (nats per character):")
        say(format_losses(reports))
        say(f"trained {step:,} steps in {train_time:.1f} s ({results['steps_per_s'] or 0:,.0f} steps/s); "
            f"wall time {wall:.1f} s"
            + (f" (time budget {cfg.time_budget:g} s)" if cfg.time_budget is not None and ckpt is None else ""))
        if samples:
            say(f"samples (seed {cfg.seed + 10}; * = occurs in the training words):")
            say(format_samples(samples))
        say(f"wrote {run_dir / RESULTS_NAME}; next: charmlp sample {run_dir}, charmlp plot {run_dir}")
    return results


# --------------------------------------------------------------------------- lr-find


def lr_find(cfg: TrainConfig, lre_min: float = -3.0, lre_max: float = 0.0, num: int = 1000,
            log: Callable[[str], None] = print) -> dict:
    """The lecture's learning-rate sweep: one SGD step at each of ``10 ** linspace(min, max, num)``.

    Returns the exponents, the minibatch losses (and their running mean over ~5 % of the
    sweep) and the suggested rate: the left edge of the valley, i.e. the lowest rate whose
    smoothed loss is within 10 % of the smoothed minimum. That is the lecture's reasoning
    ("the loss stops improving around here"): the minimum itself sits where a single step
    is already close to too large, and a whole run at that rate is less stable. On
    names.txt it gives about 0.1, the lecture's choice.
    """
    cfg = cfg.resolved()
    if num < 2:
        raise ConfigError(f"the sweep needs at least 2 rates, got {num}")
    if not lre_min < lre_max:
        raise ConfigError(f"lr exponent range must be increasing, got {lre_min}..{lre_max}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _check_device(cfg)
    device = torch.device(cfg.device)
    _, vocab, split = _load_split(cfg, log)
    X, Y = (t.to(device) for t in build_examples(split.train, vocab, cfg.block_size))
    model = _build_model(cfg, vocab.size, device)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, 0))
    lre = torch.linspace(lre_min, lre_max, num)
    lrs = (10 ** lre).tolist()
    ix = draw_batches(gen, X.shape[0], num, cfg.batch_size).to(device)
    losses = model.sgd_steps(X[ix], Y[ix], lrs).tolist()  # one SGD step per rate, one call
    arr = np.array(losses, dtype=np.float64)
    arr = np.where(np.isfinite(arr), arr, np.inf)
    w = max(1, num // 20)
    padded = np.concatenate([np.full(w // 2, arr[0]), arr, np.full(w - 1 - w // 2, arr[-1])])
    smooth = np.convolve(padded, np.ones(w) / w, mode="valid")
    best = int(np.argmin(smooth))
    edge = int(np.flatnonzero(smooth[:best + 1] <= smooth[best] * 1.1)[0])
    suggested = 10 ** float(lre[edge])
    log(f"lowest smoothed loss {smooth[best]:.4f} at lr {10 ** float(lre[best]):.3g} "
        f"(10^{float(lre[best]):.2f}); the valley starts at 10^{float(lre[edge]):.2f}: "
        f"suggested lr {suggested:.2g}")
    return {"lre": lre.tolist(), "losses": losses, "smoothed": smooth.tolist(),
            "best_lr": 10 ** float(lre[best]), "suggested_lr": suggested}
