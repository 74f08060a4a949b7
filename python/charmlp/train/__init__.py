"""Training: the lecture's loop, made reproducible, resumable and distributed.

:func:`train` runs ``charmlp train``. Its defaults are the makemore MLP lecture's final
model (block 3, embedding 10, hidden 200, 200,000 steps of batch 32, plain SGD at 0.1 then
0.01 from step 100,000, the notebook's parameter draws). On top of the lecture's loop:

* **Speed.** Minibatches are drawn for a chunk of steps (~0.2 s) at once. Plain SGD runs
  each chunk as one ``mlp_sgd_steps`` op call (:meth:`MLPLanguageModel.sgd_steps`), bitwise
  the steps a loop of ``sgd_step`` calls would take; AdamW (and SGD with weight decay) runs
  the loop users write with a fused ``torch.optim`` optimizer (:mod:`.loop`).
* **Reproducibility.** Parameters are drawn from ``torch.Generator().manual_seed(seed)``
  (the notebook's generator for the default seed 2147483647) and minibatches from a
  dedicated generator seeded from ``(seed, rank)`` (:mod:`.dataset`); nothing depends on
  global RNG state.
* **Resumability.** A checkpoint holds every piece of state (:mod:`.state`), so
  ``--resume`` continues bitwise identically on CPU. Ctrl-C or SIGTERM stops after the
  current step (:mod:`.signals`) and writes a checkpoint first.
* **Time budgets.** ``--time-budget SECONDS`` fixes the number of steps that fit from a
  measurement of the step rate before the first step (:mod:`.budget`).
* **One run, one directory, one writer** (:mod:`.rundir`): the run directory is locked
  while a process writes it; default names never collide.
* **Divergence** ends the run with :class:`TrainingDiverged`, leaving a consistent run
  directory (:mod:`.report`).
* **Distributed.** Under ``torchrun`` the model is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on CUDA); the ranks agree on stopping at chunk boundaries, and every
  collective has a timeout, :data:`DIST_TIMEOUT_ENV` (:mod:`.distributed`).

The modules, in the order a run uses them: :mod:`.config` (settings, presets, the
learning-rate schedule), :mod:`.run` (:func:`train`: setup, then the loop, then the
report), :mod:`.dataset`, :mod:`.rundir`, :mod:`.state`, :mod:`.budget`, :mod:`.loop` (the
steps down to the op call), :mod:`.progress`, :mod:`.signals`, :mod:`.distributed`,
:mod:`.evaluation`, :mod:`.report`, :mod:`.errors`; and :mod:`.lr_sweep` (:func:`lr_find`).
"""

from .budget import BUDGET_PROBE_MAX_S, BUDGET_PROBE_MIN_S, BUDGET_PROBE_SHARE, budget_steps
from .config import (
    LR_DEFAULTS,
    OPTIMIZERS,
    PRESETS,
    RESUME_MUTABLE,
    SCHEDULES,
    SEED_LIMIT,
    WD_DEFAULTS,
    ConfigError,
    TrainConfig,
    _check_length,
    learning_rate,
    preset_config,
    resume_config,
)
from .dataset import batch_seed, draw_batches
from .distributed import DIST_TIMEOUT_DEFAULT_S, DIST_TIMEOUT_ENV
from .errors import PeerLost, TrainingDiverged, TrainingInterrupted
from .evaluation import MAX_LOSS, evaluate, format_losses, loss_report
from .lr_sweep import lr_find
from .progress import Progress
from .rundir import EVALS_NAME, METRICS_NAME, RESULTS_NAME, _resume_dir
from .run import train
from .signals import _StopRequest
from .state import _build_model

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
