"""The training state: the model, its optimizer and minibatch generator, the step count,
and the checkpoint that holds all of it.

A checkpoint (see :mod:`charmlp.checkpoint`) holds every piece of state (parameters,
optimizer state, every rank's minibatch generator, the global RNGs, the config, the
vocabulary and split), so ``--resume`` continues bitwise identically on CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import CHECKPOINT_NAME, CheckpointError, save_checkpoint
from ..model import MLPLanguageModel
from .config import ConfigError, TrainConfig
from .dataset import _Data, batch_seed
from .distributed import _barrier, _Dist, _gather, _wrap_ddp
from .rundir import _RunFiles


def _check_device(cfg: TrainConfig) -> None:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this torch sees no CUDA device "
                              f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if not cfg.reference:
            from .. import has_cuda_kernels

            if not has_cuda_kernels():
                raise ConfigError("--device cuda: this charmlp build has no CUDA kernels; "
                                  "rebuild with a CUDA torch and nvcc, or add --reference")


def _build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> MLPLanguageModel:
    # init="default" draws from the global RNG (nn.init), "notebook" from its own generator.
    torch.manual_seed(cfg.seed)
    model = MLPLanguageModel(vocab_size=vocab_size, block_size=cfg.block_size,
                             emb_dim=cfg.emb_dim, hidden=cfg.hidden, fused=not cfg.reference,
                             init=cfg.init, generator=torch.Generator().manual_seed(cfg.seed))
    return model.to(device)


def _make_optimizer(cfg: TrainConfig, model: MLPLanguageModel) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters (CPU and CUDA); on CPU at the lecture's size
    # AdamW.step is ~60 us fused against ~180 us for the default per-tensor loop.
    optim = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    return optim(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@dataclass(eq=False)
class _Run:
    """One :func:`~charmlp.train.train` call: its settings, data and training state, which
    the loop's functions share (and change: ``step``, ``train_time``, ...)."""

    cfg: TrainConfig
    d: _Dist
    device: torch.device
    run_dir: Path
    data: _Data
    Xtr: torch.Tensor                    # the training examples, on ``device``
    Ytr: torch.Tensor
    model: MLPLanguageModel
    net: torch.nn.Module                 # what the steps call: the model, or its DDP wrapper
    opt: torch.optim.Optimizer | None    # None: plain SGD, run by the model's own fused steps
    gen: torch.Generator                 # this rank's minibatch generator
    say: Callable[[str], None]           # rank 0's log (silent on the other ranks)
    wall0: float                         # train()'s start, time.perf_counter()
    on_eval: Callable[[dict], None] | None = None
    resumed: bool = False
    budget: dict | None = None           # --time-budget's estimate (its step count among it)
    step: int = 0                        # steps taken
    train_time: float = 0.0              # seconds spent in training steps (resumed: all of them)
    good_step: int | None = None         # the step of the last checkpoint that had not diverged
    last_lr: float = 0.0                 # the learning rate of the last step taken
    eval_time: float = 0.0               # seconds spent in periodic evaluations (for on_eval)
    files: _RunFiles | None = None       # rank 0's metrics.csv and evals.csv

    @property
    def fast_sgd(self) -> bool:
        """Plain SGD in a single process: a chunk of steps is one ``model.sgd_steps`` call."""
        return self.opt is None

    @property
    def nparams(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _new_run(cfg: TrainConfig, d: _Dist, device: torch.device, run_dir: Path, data: _Data,
             say: Callable[[str], None], wall0: float, on_eval, resumed: bool) -> _Run:
    """The model (drawn from ``cfg.seed``), its optimizer, DDP wrapper and minibatch generator."""
    Xtr, Ytr = (t.to(device) for t in data.tensors["train"])
    model = _build_model(cfg, data.vocab.size, device)
    # DDP needs the autograd path (forward through the wrapped module, backward,
    # optimizer.step), so under torchrun plain SGD runs as torch.optim.SGD.
    fast_sgd = cfg.optimizer == "sgd" and cfg.weight_decay == 0 and not d.enabled
    path = ("fused charmlp ops" if not cfg.reference else "plain PyTorch ops (--reference)")
    say(f"model: block {cfg.block_size}, emb {cfg.emb_dim}, hidden {cfg.hidden}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {cfg.init} init; {path} on "
        f"{device}, {torch.get_num_threads()} thread(s)"
        + (f", {d.world_size} DDP processes" if d.enabled else ""))
    opt = None if fast_sgd else _make_optimizer(cfg, model)
    net = _wrap_ddp(d, model, device)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, d.rank))
    return _Run(cfg, d, device, run_dir, data, Xtr, Ytr, model, net, opt, gen, say, wall0,
                on_eval, resumed)


def _restore(run: _Run, ckpt: dict) -> None:
    """Continue from checkpoint ``ckpt``: parameters, optimizer state, this rank's
    minibatch generator, the global RNGs, the step count and the training time so far."""
    try:
        run.model.load_state_dict(ckpt["model"]["state_dict"])
        if run.opt is not None:
            if ckpt["optimizer"].get("state") is None:
                raise ValueError("the checkpoint has no optimizer state for "
                                 f"{run.cfg.optimizer}")
            run.opt.load_state_dict(ckpt["optimizer"]["state"])
        run.gen.set_state(ckpt["rng"]["batch"][run.d.rank])
        _restore_global_rng(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{run.run_dir}: incompatible checkpoint: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    run.step, run.train_time = ckpt["step"], ckpt["train_time_s"]
    if run.step > run.cfg.steps:
        raise ConfigError(f"the run is already at step {run.step:,}, beyond --steps {run.cfg.steps:,}")
    run.good_step = ckpt["step"]


def _save_checkpoint(run: _Run, diverged: dict | None = None) -> None:
    """Write the checkpoint of ``run.step`` (rank 0; every rank's minibatch generator
    state in it). ``diverged``: the state is a diverged one, which resume refuses."""
    states = _gather(run.d, run.gen.get_state())
    if run.d.is_main:
        extra = {} if diverged is None else {"diverged": diverged}  # (resume refuses it)
        if run.budget is not None:
            extra["budget"] = run.budget
        model, opt, data = run.model, run.opt, run.data
        save_checkpoint(run.run_dir / CHECKPOINT_NAME, {**extra,
            "step": run.step,
            "model": {"config": model.config(),
                      "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
            "optimizer": {"name": run.cfg.optimizer, "state": opt.state_dict() if opt is not None else None},
            "rng": _rng_state([s.cpu() for s in states]),
            "train_config": run.cfg.to_dict(),
            "vocab": data.vocab.to_dict(),
            "split": data.split.to_dict(),
            "corpus": data.corpus,
            "world_size": run.d.world_size,
            "train_time_s": float(run.train_time),
        })
    if diverged is None:
        run.good_step = run.step
    _barrier(run.d)  # no rank leaves (it may exit next) before rank 0 has written it


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
