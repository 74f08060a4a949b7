"""Training settings: :class:`TrainConfig`, its validation, the presets, what ``--resume``
may change, and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..model import NOTEBOOK_SEED

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
#: Seeds are 0 <= seed < 2**63: torch.Generator.manual_seed takes a signed 64-bit value.
SEED_LIMIT = 2**63

#: Named recipes for ``--preset`` (``charmlp train --preset NAME``): settings that replace
#: the defaults; explicit flags still win. ``lecture`` is the default model itself.
#: ``best-5min`` is the best model found in 5 minutes of 2 CPU cores on names.txt's lecture
#: split, tuned on the dev split alone (tools/sweep_preset.py and its table in
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
