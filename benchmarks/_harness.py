"""Shared machinery of the charmlp benchmark suite.

Everything the scripts in ``benchmarks/`` have in common lives here:

* the **sizes** (lecture T=3, E=10, H=200, V=27 at several batch sizes; the large
  T=8, E=64, H=1024 model) and the **batches** (rows of names.txt when it can be found,
  otherwise uniform random ids; identical for every arm);
* the **arms**: the same model trained the seed notebook's way, with ``F.embedding`` /
  ``F.linear`` / ``torch.optim.SGD``, under ``torch.compile``, and with charmlp, plus the
  CUDA-only arms (``torch.compile(mode="reduce-overhead")``, a CUDA-graph-captured charmlp
  step). Every arm starts from the same float32 weights;
* the **correctness gate**: before any timing, each arm's loss, the five gradients and the
  parameters after one SGD step are compared with a float64 evaluation of the seed
  notebook's code on the same weights; an arm that does not match is FAILED and not timed;
* the **timer**: warm-up, then rounds in which every arm runs each measurement once, in
  an order that rotates from round to round (``perf_counter_ns`` on CPU, CUDA events on a
  GPU); medians and inter-quartile ranges over the rounds;
* **peak memory** of a training step, the **SGEMM peak** of the machine (roofline), and
  the **report** (Markdown, JSON, PNG plots).

The scripts are thin wrappers around :func:`run_suite`, :func:`measure_sgemm_peak`,
:func:`run_embed_ablation` and :func:`write_report`; ``run_all.py`` runs them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import charmlp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MEASUREMENTS = ("forward", "backward", "fwd_bwd", "step")
MEASUREMENT_LABELS = {
    "forward": "forward (loss, under no_grad)",
    "backward": "backward",
    "fwd_bwd": "forward + backward",
    "step": "training step",
}
#: FLOPs of each measurement, as a multiple of 2*B*H*(T*E + V) (the two GEMMs of the
#: unfused forward); the training step is 6*B*H*(T*E + V), the issue's roofline count.
FLOP_MULTIPLE = {"forward": 1, "backward": 2, "fwd_bwd": 3, "step": 3}

LR = 0.1

# --------------------------------------------------------------------------------------
# sizes and data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    name: str
    T: int  # block size (context length)
    E: int  # embedding width
    H: int  # hidden width
    V: int  # vocabulary
    B: int  # batch rows; 0 = every row of the data set (the full batch)

    @property
    def family(self) -> str:
        return self.name.split("-")[0]

    def flops(self, B: int, measurement: str = "step") -> float:
        return FLOP_MULTIPLE[measurement] * 2.0 * B * self.H * (self.T * self.E + self.V)


FULL_BATCH_ROWS = 228_146  # rows of names.txt at block size 3 (the lecture's full batch)

SIZES: dict[str, Size] = {
    "lecture-32": Size("lecture-32", 3, 10, 200, 27, 32),
    "lecture-256": Size("lecture-256", 3, 10, 200, 27, 256),
    "lecture-4096": Size("lecture-4096", 3, 10, 200, 27, 4096),
    "lecture-32768": Size("lecture-32768", 3, 10, 200, 27, 32768),
    "lecture-full": Size("lecture-full", 3, 10, 200, 27, 0),
    "large-4096": Size("large-4096", 8, 64, 1024, 27, 4096),
    # not in the default run: a tiny model for smoke tests
    "tiny-64": Size("tiny-64", 3, 4, 16, 27, 64),
}
DEFAULT_SIZES = ["lecture-32", "lecture-256", "lecture-4096", "lecture-32768", "lecture-full", "large-4096"]


def parse_size(spec: str) -> Size:
    """A size by name (see ``SIZES``) or ``T:E:H:V:B`` (B=0: the full data set)."""
    spec = spec.strip()
    if spec in SIZES:
        return SIZES[spec]
    parts = spec.split(":")
    if len(parts) == 5 and all(p.isdigit() for p in parts):
        T, E, H, V, B = (int(p) for p in parts)
        if min(T, E, H) < 1 or V < 2 or B < 0:
            raise argparse.ArgumentTypeError(f"bad size {spec!r}")
        return Size(f"custom_T{T}E{E}H{H}V{V}-{B or 'full'}", T, E, H, V, B)
    raise argparse.ArgumentTypeError(
        f"unknown size {spec!r}: use one of {', '.join(SIZES)} or T:E:H:V:B (B=0 for the full batch)"
    )


def find_names_txt() -> Path | None:
    """names.txt of the lecture, if this checkout has it beside it (shared/data/)."""
    env = os.environ.get("CHARMLP_NAMES")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "shared" / "data" / "names.txt", REPO.parent / "shared" / "data" / "names.txt",
                   Path("/work/shared/data/names.txt")]
    for c in candidates:
        if c.is_file():
            return c
    return None


_EXAMPLES_CACHE: dict = {}


def make_batch(size: Size, data: str, device: torch.device, seed: int = 1234) -> tuple[Tensor, Tensor, str]:
    """``idx [B, T]`` int64 and ``targets [B]`` for one size; identical for every arm.

    ``data`` is ``"names"`` (rows of names.txt built like the lecture, falling back to
    random when the file is missing or its vocabulary is not V), ``"random"`` (uniform ids)
    or a path to a word list. The full batch (B=0) is every row of the data set; a smaller
    B is drawn with a fixed generator, like the notebook's minibatches.
    """
    g = torch.Generator().manual_seed(seed)
    source = None
    if data != "random":
        path = find_names_txt() if data == "names" else Path(data)
        if path is not None and path.is_file():
            key = (str(path), size.T)
            if key not in _EXAMPLES_CACHE:
                from charmlp.data import Vocab, build_examples, load_corpus

                corpus = load_corpus(path)
                vocab = Vocab.from_words(corpus.words)
                X, Y = build_examples(corpus.words, vocab, size.T)
                _EXAMPLES_CACHE[key] = (X, Y, vocab.size, path)
            X, Y, vsize, path = _EXAMPLES_CACHE[key]
            if vsize == size.V:
                source = f"{path.name} ({X.shape[0]:,} rows at block {size.T})"
                if size.B == 0:
                    idx, y = X, Y
                else:
                    rows = torch.randint(0, X.shape[0], (size.B,), generator=g)
                    idx, y = X[rows], Y[rows]
    if source is None:
        B = size.B or FULL_BATCH_ROWS
        idx = torch.randint(0, size.V, (B, size.T), generator=g)
        y = torch.randint(0, size.V, (B,), generator=g)
        source = "uniform random ids"
    return idx.contiguous().to(device), y.contiguous().to(device), source


def make_params(size: Size, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """The canonical float32 weights every arm starts from (``nn.Embedding`` / ``nn.Linear``
    initialization), in charmlp's layout: table [V,E], W1 [H,T*E], b1 [H], W2 [V,H], b2 [V]."""
    torch.manual_seed(seed)
    m = charmlp.MLPLanguageModel(size.V, size.T, size.E, size.H, fused=False)
    return {
        "table": m.embed.table.detach().clone().to(device),
        "W1": m.embed.weight.detach().clone().to(device),
        "b1": m.embed.bias.detach().clone().to(device),
        "W2": m.head.weight.detach().clone().to(device),
        "b2": m.head.bias.detach().clone().to(device),
    }


PARAM_NAMES = ("table", "W1", "b1", "W2", "b2")


# --------------------------------------------------------------------------------------
# the reference (float64 seed-notebook code) and the gate
# --------------------------------------------------------------------------------------


def reference(params: dict[str, Tensor], idx: Tensor, y: Tensor, lr: float) -> dict:
    """Loss, gradients and SGD-updated parameters in float64 (the seed notebook's code)."""
    p = {k: v.detach().double().clone().requires_grad_() for k, v in params.items()}
    emb = p["table"][idx]
    h = torch.tanh(emb.view(-1, idx.shape[1] * p["table"].shape[1]) @ p["W1"].T + p["b1"])
    logits = h @ p["W2"].T + p["b2"]
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [p[k] for k in PARAM_NAMES])
    grads = dict(zip(PARAM_NAMES, grads))
    updated = {k: (p[k] - lr * grads[k]).detach() for k in PARAM_NAMES}
    return {"loss": loss.detach(), "grads": grads, "updated": updated}


# float32 tolerances, relative to each tensor's largest magnitude (gradient entries that
# are sums of many cancelling terms have no meaningful element-wise relative error). The
# float32 eager code itself is ~1e-4 off in the table gradient at the full batch (27 rows
# accumulating 684k contributions each); a wrong arm is off by O(1).
GATE_RTOL = {"loss": 1e-5, "grads": 1e-3}


def _rel_err(got: Tensor, ref: Tensor) -> float:
    got = got.detach().to(ref.device, torch.float64)
    if got.shape != ref.shape:
        return math.inf
    if not torch.isfinite(got).all():
        return math.inf
    scale = max(ref.abs().max().item(), 1e-30)
    return (got - ref).abs().max().item() / scale


def gate_errors(loss: Tensor | None, grads: dict | None, updated: dict | None, step_loss: Tensor | None,
                ref: dict, start: dict | None = None, lr: float = LR) -> dict[str, float]:
    """Relative max errors of everything an arm produced against the float64 reference.

    ``grad.<p>``: the gradients after ``forward`` + ``backward``; ``step.loss``: the loss a
    training step returns; ``step.<p>``: the gradient a training step applied, recovered
    from the parameters before (``start``) and after (``updated``) as ``(start - updated) / lr``
    (which also catches a wrong learning rate or a parameter left out of the update).
    """
    errs: dict[str, float] = {}
    if loss is not None:
        errs["loss"] = _rel_err(loss.reshape(()), ref["loss"])
    if grads is not None:
        for k in PARAM_NAMES:
            g = grads.get(k)
            errs[f"grad.{k}"] = math.inf if g is None else _rel_err(g, ref["grads"][k])
    if step_loss is not None:
        errs["step.loss"] = _rel_err(step_loss.reshape(()), ref["loss"])
    if updated is not None and start is not None:
        for k in PARAM_NAMES:
            applied = (start[k].double() - updated[k].to(start[k].device).double()) / lr
            errs[f"step.{k}"] = _rel_err(applied, ref["grads"][k])
    return errs


def gate_passes(errs: dict[str, float]) -> tuple[bool, str]:
    bad = []
    for k, e in errs.items():
        kind = "loss" if k.endswith("loss") else "grads"
        if not e <= GATE_RTOL[kind]:
            bad.append(f"{k} rel.err {e:.2e} > {GATE_RTOL[kind]:.0e}")
    return (not bad), "; ".join(bad)


# --------------------------------------------------------------------------------------
# arms
# --------------------------------------------------------------------------------------


class Arm:
    """One way of computing the model. Subclasses implement the five hooks below.

    ``forward`` returns the loss with the autograd graph recorded (the forward of a
    training step); ``backward`` consumes it; ``zero_grad`` (untimed) clears gradients so
    ``backward`` starts clean; ``train_step`` is the whole step the way the arm's user would
    write it (its own gradient zeroing included) and returns the loss.
    """

    name = "arm"
    label = "arm"
    description = ""
    cuda_only = False
    #: measurements this arm supports (others are reported as n/a)
    measurements: tuple[str, ...] = MEASUREMENTS

    def available(self, device: torch.device) -> tuple[bool, str]:
        if self.cuda_only and device.type != "cuda":
            return False, "needs a CUDA device"
        return True, ""

    def setup(self, params: dict[str, Tensor], size: Size, idx: Tensor, y: Tensor, lr: float) -> None:
        raise NotImplementedError

    #: canonical names whose tensor the arm keeps transposed (the notebook's W1 [T*E, H], W2 [H, V])
    transposed: frozenset = frozenset()

    def load(self, params: dict[str, Tensor]) -> None:
        """Copies the canonical weights into the arm's parameters (in place)."""
        with torch.no_grad():
            for k, t in self._tensors().items():
                t.copy_(params[k].T if k in self.transposed else params[k])

    def _tensors(self) -> dict[str, Tensor]:
        """The arm's parameter tensors by canonical name (in the arm's layout)."""
        raise NotImplementedError

    def _layout(self, d: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Arm layout -> charmlp's layout."""
        return {k: (v.T if (k in self.transposed and v is not None) else v) for k, v in d.items()}

    def params(self) -> dict[str, Tensor]:
        return self._layout({k: t.detach() for k, t in self._tensors().items()})

    def grads(self) -> dict[str, Tensor | None]:
        return self._layout({k: t.grad for k, t in self._tensors().items()})

    def zero_grad(self) -> None:
        for t in self._tensors().values():
            t.grad = None

    def forward(self, idx: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def train_step(self, idx: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class SeedArm(Arm):
    """The seed notebook's code, verbatim in spirit."""

    name = "seed"
    label = "seed eager"
    transposed = frozenset({"W1", "W2"})
    description = (
        "The makemore part-2 notebook's code: `emb = C[X]`, `h = torch.tanh(emb.view(-1, T*E) @ W1 + b1)`, "
        "`logits = h @ W2 + b2`, `F.cross_entropy`, `loss.backward()`; step: `p.grad = None` for every "
        "parameter, forward, backward, `p.data += -lr * p.grad`. W1 is [T*E, H] and W2 [H, V] as in the notebook."
    )

    def setup(self, params, size, idx, y, lr):
        self.lr = lr
        self.TE = size.T * size.E
        self.C = params["table"].clone().requires_grad_()
        self.W1 = params["W1"].T.contiguous().requires_grad_()
        self.b1 = params["b1"].clone().requires_grad_()
        self.W2 = params["W2"].T.contiguous().requires_grad_()
        self.b2 = params["b2"].clone().requires_grad_()
        self.parameters = [self.C, self.W1, self.b1, self.W2, self.b2]

    def _tensors(self):
        return {"table": self.C, "W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}

    def forward(self, X, Y):
        emb = self.C[X]
        h = torch.tanh(emb.view(-1, self.TE) @ self.W1 + self.b1)
        logits = h @ self.W2 + self.b2
        return F.cross_entropy(logits, Y)

    def train_step(self, X, Y):
        loss = self.forward(X, Y)
        for p in self.parameters:
            p.grad = None
        loss.backward()
        for p in self.parameters:
            p.data += -self.lr * p.grad
        return loss


class EagerMLP(nn.Module):
    """The model as an ``nn.Module`` with ``F.embedding`` / ``F.linear`` (nn.Linear layout)."""

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.table = nn.Parameter(params["table"].clone())
        self.W1 = nn.Parameter(params["W1"].clone())
        self.b1 = nn.Parameter(params["b1"].clone())
        self.W2 = nn.Parameter(params["W2"].clone())
        self.b2 = nn.Parameter(params["b2"].clone())

    def forward(self, idx: Tensor, y: Tensor) -> Tensor:
        emb = F.embedding(idx, self.table)
        h = torch.tanh(F.linear(emb.flatten(1), self.W1, self.b1))
        return F.cross_entropy(F.linear(h, self.W2, self.b2), y)


class FunctionalArm(Arm):
    name = "functional"
    label = "eager F.*+SGD"
    description = (
        "An `nn.Module` using `F.embedding`, `F.linear`, `torch.tanh`, `F.cross_entropy` (weights in nn.Linear "
        "layout); step: `opt.zero_grad()`, forward, `loss.backward()`, `opt.step()` with `torch.optim.SGD(lr)` "
        "(PyTorch's default implementation choice for the device)."
    )

    def setup(self, params, size, idx, y, lr):
        self.model = EagerMLP(params)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def _tensors(self):
        m = self.model
        return {"table": m.table, "W1": m.W1, "b1": m.b1, "W2": m.W2, "b2": m.b2}

    def forward(self, idx, y):
        return self.model(idx, y)

    def train_step(self, idx, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(idx, y)
        loss.backward()
        self.opt.step()
        return loss


def _fresh(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo keeps compiled code per code object
    and (modules' parameters being graph inputs) its guards do not tell two arms' models
    apart, nor do they cover config such as ``trace_autograd_ops``: without this, a second
    compile arm silently reuses the first one's compiled code."""
    import types

    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compiled_forward(model: nn.Module, tag: str) -> Callable:
    def forward(idx: Tensor, y: Tensor) -> Tensor:
        return model(idx, y)

    return _fresh(forward, tag)


def _compiled_step(model: nn.Module, lr: float, tag: str) -> Callable:
    params = list(model.parameters())

    def step(idx: Tensor, y: Tensor) -> Tensor:
        for p in params:
            p.grad = None
        loss = model(idx, y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-lr)
        return loss.detach()

    return _fresh(step, tag)


class CompileArm(FunctionalArm):
    name = "compile"
    label = "torch.compile"
    mode: str | None = None  # torch.compile mode
    description = (
        "`torch.compile` (default mode, `dynamic=False`, recompiled for each size after `torch._dynamo.reset()`) "
        "of the eager F.* model: forward = a compiled call of the module (AOTAutograd also compiles its backward, which "
        "`loss.backward()` runs); step = a compiled function `p.grad = None` / forward / `loss.backward()` / "
        "`p.add_(p.grad, alpha=-lr)`; Dynamo breaks the graph at `loss.backward()`, so the step runs as a "
        "compiled forward, the compiled backward and a compiled update. Compilation is done in the gate and "
        "warm-up, never timed."
    )

    def setup(self, params, size, idx, y, lr):
        self.model = EagerMLP(params)
        kw = {"dynamic": False}
        if self.mode:
            kw["mode"] = self.mode
        tag = self.name.replace("-", "_")
        self.cmodel = torch.compile(_compiled_forward(self.model, tag), **kw)
        self.cstep = torch.compile(_compiled_step(self.model, lr, tag), **kw)

    def forward(self, idx, y):
        return self.cmodel(idx, y)

    def train_step(self, idx, y):
        return self.cstep(idx, y)


class CompileTracedArm(CompileArm):
    name = "compile-traced"
    label = "compile (traced bwd)"
    description = (
        "Like `compile`, but with `torch._dynamo.config.trace_autograd_ops = True` so Dynamo traces "
        "`loss.backward()` and the whole training step is one compiled region (not in the default run)."
    )

    def _patch(self):
        return torch._dynamo.config.patch(trace_autograd_ops=True)

    def forward(self, idx, y):
        with self._patch():
            return self.cmodel(idx, y)

    def train_step(self, idx, y):
        with self._patch():
            return self.cstep(idx, y)


class CompileReduceOverheadArm(CompileArm):
    name = "compile-ro"
    label = "compile reduce-overhead"
    mode = "reduce-overhead"
    cuda_only = True
    description = (
        "`torch.compile(mode=\"reduce-overhead\")` (CUDA graphs via cudagraph trees) of the same model and step; "
        "`torch.compiler.cudagraph_mark_step_begin()` before each forward and step."
    )

    def forward(self, idx, y):
        torch.compiler.cudagraph_mark_step_begin()
        return self.cmodel(idx, y)

    def train_step(self, idx, y):
        torch.compiler.cudagraph_mark_step_begin()
        return self.cstep(idx, y)


class CharmlpArm(Arm):
    name = "charmlp"
    label = "charmlp"
    description = (
        "`charmlp.MLPLanguageModel(fused=True)`: forward `_, loss = m(idx, targets, return_logits=False)` (the "
        "logits-free form: the whole model as one `mlp_cross_entropy` op; under grad its forward also computes "
        "the five parameter gradients, so the backward column is only their hand-over to `.grad`: compare "
        "forward + backward), backward `loss.backward()` (charmlp's registered autograd), step "
        "`m.sgd_step(idx, targets, lr)`."
    )

    def available(self, device):
        if device.type == "cuda" and not charmlp.has_cuda_kernels():
            return False, "charmlp was built without CUDA kernels"
        return super().available(device)

    def setup(self, params, size, idx, y, lr):
        import inspect

        self.lr = lr
        self.m = charmlp.MLPLanguageModel(size.V, size.T, size.E, size.H, fused=True, device=idx.device)
        self.load(params)
        # the logits-free form of the forward: loss only, logits never materialized
        self.fkw = {"return_logits": False} if "return_logits" in inspect.signature(self.m.forward).parameters else {}

    def _tensors(self):
        m = self.m
        return {"table": m.embed.table, "W1": m.embed.weight, "b1": m.embed.bias, "W2": m.head.weight, "b2": m.head.bias}

    def forward(self, idx, y):
        return self.m(idx, y, **self.fkw)[1]

    def train_step(self, idx, y):
        return self.m.sgd_step(idx, y, self.lr)


class CharmlpLoopArm(CharmlpArm):
    name = "charmlp-loop"
    label = "charmlp model(x, y) + optim.SGD"
    description = (
        "The loop users write, with `charmlp.MLPLanguageModel(fused=True)` swapped in: forward "
        "`logits, loss = m(idx, targets)` (one `mlp_logits_cross_entropy` op: logits, loss and, under grad, the "
        "five parameter gradients), backward `loss.backward()`, step `opt.zero_grad()`, forward, backward, "
        "`opt.step()` with `torch.optim.SGD(lr)`."
    )

    def setup(self, params, size, idx, y, lr):
        super().setup(params, size, idx, y, lr)
        self.opt = torch.optim.SGD(self.m.parameters(), lr=lr)

    def forward(self, idx, y):
        return self.m(idx, y)[1]

    def train_step(self, idx, y):
        logits, loss = self.m(idx, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss


class CharmlpGraphArm(CharmlpArm):
    name = "charmlp-graph"
    label = "charmlp CUDA graph"
    cuda_only = True
    measurements = ("fwd_bwd", "step")
    description = (
        "charmlp with each computation captured once in a `torch.cuda.CUDAGraph` on static input buffers "
        "(3 warm-up calls on a side stream first): fwd+bwd = a replay of `loss = m(idx, y)[1]; "
        "torch.autograd.grad(loss, params)` (`return_logits=False`), step = a replay of `m.sgd_step`; each call first copies the batch "
        "into the static buffers (skipped when it is the same tensor)."
    )

    def setup(self, params, size, idx, y, lr):
        super().setup(params, size, idx, y, lr)
        self.sidx, self.sy = idx.clone(), y.clone()
        plist = list(self._tensors().values())

        def fb():
            loss = self.m(self.sidx, self.sy, **self.fkw)[1]
            return loss, torch.autograd.grad(loss, plist)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fb()
                self.m.sgd_step(self.sidx, self.sy, lr)
        torch.cuda.current_stream().wait_stream(s)
        self.g_fb = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g_fb):
            self.fb_loss, self.fb_grads = fb()
        self.g_step = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g_step):
            self.step_loss = self.m.sgd_step(self.sidx, self.sy, lr)
        self.load(params)  # warm-up and capture changed the weights
        torch.cuda.synchronize()

    def _inputs(self, idx, y):
        if idx is not self.sidx:
            self.sidx.copy_(idx)
        if y is not self.sy:
            self.sy.copy_(y)

    def fwd_bwd(self, idx, y):
        self._inputs(idx, y)
        self.g_fb.replay()
        return self.fb_loss

    def grads(self):
        return dict(zip(PARAM_NAMES, self.fb_grads))

    def train_step(self, idx, y):
        self._inputs(idx, y)
        self.g_step.replay()
        return self.step_loss


class _AroundCalls:
    """Mixin for a charmlp arm: its setup and every timed call run with a process-wide
    setting switched (``_switch`` sets it and returns what restores it)."""

    def _switch(self) -> Callable[[], None]:
        raise NotImplementedError

    def _with(self, fn):
        restore = self._switch()
        try:
            return fn()
        finally:
            restore()

    def setup(self, *a):
        return self._with(lambda: super(_AroundCalls, self).setup(*a))

    def forward(self, idx, y):
        return self._with(lambda: super(_AroundCalls, self).forward(idx, y))

    def backward(self, loss):
        return self._with(lambda: super(_AroundCalls, self).backward(loss))

    def train_step(self, idx, y):
        return self._with(lambda: super(_AroundCalls, self).train_step(idx, y))


class CharmlpAlgorithmArm(_AroundCalls, CharmlpArm):
    """charmlp with the CPU embedding algorithm forced (for the ablation)."""

    algorithm = "auto"

    def __init__(self, algorithm: str = "auto"):
        self.algorithm = algorithm
        self.name = f"charmlp-{algorithm}"
        self.label = f"charmlp ({algorithm})"
        self.description = f"charmlp with `charmlp._C._set_embed_algorithm({algorithm!r})`."

    def _switch(self):
        prev = charmlp._C._get_embed_algorithm()
        charmlp._C._set_embed_algorithm(self.algorithm)
        return lambda: charmlp._C._set_embed_algorithm(prev)


def charmlp_capability_arm(base: type[CharmlpArm], capability: str) -> Arm:
    """A charmlp arm whose calls run the CPU kernels of another capability (``charmlp@avx2``):
    the capabilities' kernels side by side in one process, against the same PyTorch arms.
    Only charmlp's kernels change; torch's own (the PyTorch arms, MKL) keep this CPU's."""

    class _Arm(_AroundCalls, base):
        name = f"{base.name}@{capability}"
        label = f"{base.label} [{capability}]"
        description = f"{base.description} CPU kernels: `charmlp.set_cpu_capability({capability!r})`."

        def available(self, device):
            if device.type != "cpu":
                return False, "CPU capabilities are a CPU matter"
            if capability not in charmlp.build_info()["cpu_capabilities_supported"]:
                return False, f"this CPU cannot run '{capability}'"
            return super().available(device)

        def _switch(self):
            prev = charmlp.cpu_capability()
            charmlp.set_cpu_capability(capability)
            return lambda: charmlp.set_cpu_capability(prev)

    return _Arm()


ARMS: dict[str, Callable[[], Arm]] = {
    "seed": SeedArm,
    "functional": FunctionalArm,
    "compile": CompileArm,
    "charmlp-loop": CharmlpLoopArm,
    "charmlp": CharmlpArm,
    "compile-ro": CompileReduceOverheadArm,
    "charmlp-graph": CharmlpGraphArm,
    "compile-traced": CompileTracedArm,
}
# charmlp@<capability>, charmlp-loop@<capability>: the same arms on each compiled capability's kernels
for _cap in charmlp.build_info()["cpu_capabilities"]:
    for _base in (CharmlpArm, CharmlpLoopArm):
        ARMS[f"{_base.name}@{_cap}"] = (lambda b, c: lambda: charmlp_capability_arm(b, c))(_base, _cap)
DEFAULT_ARMS = ["seed", "functional", "compile", "charmlp-loop", "charmlp", "compile-ro", "charmlp-graph"]
REFERENCE_ARM = "seed"


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


class Timer:
    """Times one call: ``perf_counter_ns`` on CPU, a pair of CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds taken by ``fn()``."""
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e9


class Contention:
    """How much CPU other processes (and the hypervisor: steal time) took during a stretch of
    time, from /proc/stat (all CPUs) minus /proc/self/stat (this process, every thread).

    On a shared machine a round of timings during which something else ran is worthless
    (OpenMP threads that lose their core stall the whole op), so such rounds are discarded
    and redone. Resolution is the kernel tick (USER_HZ, usually 10 ms).
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, max_share: float = 0.05):
        self.max_share = max_share
        self.ncpu = os.cpu_count() or 1
        self.ok = Path("/proc/stat").exists()

    def snapshot(self) -> tuple[int, int, float] | None:
        if not self.ok:
            return None
        try:
            f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
            busy = user + nice + system + irq + softirq + steal
            st = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            mine = int(st[11]) + int(st[12])  # utime + stime (fields 14, 15)
            return busy, mine, time.monotonic()
        except (OSError, ValueError, IndexError):  # pragma: no cover
            self.ok = False
            return None

    def others(self, a, b) -> tuple[int, float]:
        """(ticks used by others, ticks the machine had) between two snapshots."""
        if a is None or b is None:
            return 0, 1
        cap = max(1e-9, (b[2] - a[2]) * self.HZ * self.ncpu)
        return max(0, (b[0] - a[0]) - (b[1] - a[1])), cap

    def clean(self, a, b) -> bool:
        used, cap = self.others(a, b)
        return used <= max(1, self.max_share * cap)


def _run_measurement(arm: Arm, what: str, idx: Tensor, y: Tensor, timer: Timer, inner: int = 1) -> float:
    """One timed sample of ``what``: seconds per call, averaged over ``inner`` back-to-back
    calls (a block). Untimed preparation (zeroing gradients, the forward that a backward
    needs) happens outside the timed region; a backward is always timed alone (inner=1),
    and in a forward+backward block the gradient zeroing between calls is timed too."""
    if what == "forward":
        # The loss alone, as in evaluation: under no_grad no arm records a graph, and
        # charmlp's forward does not compute the gradients it would otherwise (see
        # ops.mlp_cross_entropy); the training cost is forward + backward.
        arm.zero_grad()
        out = []

        def run():
            with torch.no_grad():
                for _ in range(inner):
                    out.append(arm.forward(idx, y))
                    out.clear()

        return timer(run) / inner
    if what == "backward":
        arm.zero_grad()
        loss = arm.forward(idx, y)
        timer.sync()
        return timer(lambda: arm.backward(loss))
    if what == "fwd_bwd":
        arm.zero_grad()
        if isinstance(arm, CharmlpGraphArm):
            def run():
                for _ in range(inner):
                    arm.fwd_bwd(idx, y)
        else:
            def run():
                for i in range(inner):
                    if i:
                        arm.zero_grad()
                    arm.backward(arm.forward(idx, y))
        return timer(run) / inner
    if what == "step":
        def run():
            for _ in range(inner):
                arm.train_step(idx, y)

        return timer(run) / inner
    raise ValueError(what)


def choose_inner(t_call: float, what: str, block_s: float) -> int:
    """Calls per timed block: enough back-to-back calls to fill ``block_s`` (1..64)."""
    if what == "backward" or block_s <= 0 or t_call <= 0:
        return 1
    return int(min(64, max(1, round(block_s / t_call))))


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    n = len(s)
    if n == 0:
        return {"n": 0}
    q = statistics.quantiles(s, n=4, method="inclusive") if n >= 2 else [s[0], s[0], s[0]]
    return {"n": n, "median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "iqr_s": q[2] - q[0],
            "min_s": s[0], "max_s": s[-1]}


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


class _quiet_stderr:
    """Silences file descriptor 2 (Kineto prints two lines per profiler session there)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:  # pragma: no cover
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def _walk(nodes, out):
    for n in nodes:
        out.append(n)
        _walk(n.children, out)
    return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by ``fn()`` above what was live before it.

    CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
    through PyTorch's CPU allocator (the calling thread's: every tensor an eager op, an
    Inductor kernel or a charmlp kernel allocates with ``at::empty``); the peak is the
    maximum of the running sum in time order. It does not see memory that libraries
    allocate outside PyTorch's allocator (MKL/oneDNN workspaces, ``std::vector`` scratch).
    CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [n for n in _walk(prof.profiler.kineto_results.experimental_event_tree(), [])
              if n.tag == _EventType.Allocation]
    allocs.sort(key=lambda n: n.start_time_ns)
    cur = peak = 0
    for n in allocs:
        cur += n.extra_fields.alloc_size
        peak = max(peak, cur)
    return int(peak)


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover
        pass
    return None


#: environment of an RSS probe: glibc hands every block of 64 KiB or more straight back to
#: the OS when it is freed (a fixed mmap threshold also turns off glibc's adaptive one), so
#: the resident set follows the memory that is actually live.
RSS_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_probe(arm_name: str, size: Size, data: str, threads: int, lr: float = LR, seed: int = 1234) -> dict:
    """Runs in a fresh process (see :func:`rss_memory`): the growth of the resident set
    during the arm's first training step at this size, above the level just before it.

    Before the baseline: imports, the batch, the weights, the arm's setup, and one training
    step on a 32-row batch (thread pools, MKL and kernels' lazy initialization); arms that
    compile per shape also run one step at this size first (compilation is not a step's
    memory). So the number counts everything the step needs that was not there before:
    activations, gradients, workspaces that kernels keep between calls (charmlp's per-thread
    scratch) and library buffers, whichever allocator they come from.
    """
    import ctypes

    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    idx, y, _ = make_batch(size, data, dev, seed)
    small = dataclasses.replace(size, B=min(32, idx.shape[0]))
    sidx, sy, _ = make_batch(small, data, dev, seed + 1)
    params = make_params(size, dev)
    arm = ARMS[arm_name]()
    arm.setup(params, size, idx, y, lr)
    if isinstance(arm, CompileArm):
        arm.train_step(idx, y)
    else:
        arm.train_step(sidx, sy)
    arm.load(params)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass
    base = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    arm.train_step(idx, y)
    hwm = _proc_status_kib("VmHWM")
    after = _proc_status_kib("VmRSS")
    return {"arm": arm_name, "size": size.name, "B": int(idx.shape[0]), "base_kib": base, "hwm_kib": hwm,
            "after_kib": after, "peak_bytes": (hwm - base) * 1024, "kept_bytes": (after - base) * 1024}


def rss_memory(arm_names: list[str], size: Size, cfg: "Config", log: Callable[[str], None] = print) -> dict:
    """One fresh process per arm runs :func:`rss_probe`; returns arm -> result (or error)."""
    import subprocess

    out = {}
    env = dict(os.environ, **RSS_PROBE_ENV)
    for name in arm_names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-probe",
               json.dumps({"arm": name, "size": dataclasses.asdict(size), "data": cfg.data,
                           "threads": cfg.threads, "lr": cfg.lr, "seed": cfg.seed})]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not line:
                raise RuntimeError((p.stderr.strip().splitlines() or ["no output"])[-1][:200])
            out[name] = json.loads(line[-1])
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {name}: RSS probe failed: {out[name]['error']}")
    return out


# --------------------------------------------------------------------------------------
# roofline
# --------------------------------------------------------------------------------------


def measure_sgemm_peak(device: torch.device, n: int | None = None, repeats: int = 7) -> dict:
    """float32 GEMM throughput of a large square matmul (median of ``repeats``)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = torch.empty(n, n, device=device)
    timer = Timer(device)
    for _ in range(2):
        torch.mm(a, b, out=c)
    ts = [timer(lambda: torch.mm(a, b, out=c)) for _ in range(repeats)]
    med = statistics.median(ts)
    flops = 2.0 * n**3
    info = {"n": n, "median_s": med, "gflops": flops / med / 1e9, "repeats": repeats,
            "best_gflops": flops / min(ts) / 1e9}
    if device.type == "cuda":
        info["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


# --------------------------------------------------------------------------------------
# one size
# --------------------------------------------------------------------------------------


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


def _check_arm(arm: Arm, params, idx, y, ref, lr) -> dict[str, float]:
    """Runs the gate computations of one arm and returns its relative errors."""
    arm.load(params)
    arm.zero_grad()
    if isinstance(arm, CharmlpGraphArm):
        loss = arm.fwd_bwd(idx, y)
        torch.cuda.synchronize()
        grads = {k: v.clone() for k, v in arm.grads().items()}
        loss = loss.clone()
    else:
        loss = arm.forward(idx, y)
        arm.backward(loss)
        grads = {k: (v.clone() if v is not None else None) for k, v in arm.grads().items()}
    arm.load(params)
    arm.zero_grad()
    step_loss = arm.train_step(idx, y)
    step_loss = step_loss.detach().clone()
    updated = {k: v.clone() for k, v in arm.params().items()}
    arm.load(params)
    arm.zero_grad()
    return gate_errors(loss, grads, updated, step_loss, ref, start=params, lr=lr)


def bench_size(size: Size, arm_factories: list[Callable[[], Arm]], cfg: Config,
               log: Callable[[str], None] = print, time_it: bool = True) -> dict:
    """Gate, time and measure the memory of every arm at one size."""
    device = cfg.device
    idx, y, source = make_batch(size, cfg.data, device, cfg.seed)
    B = idx.shape[0]
    params = make_params(size, device)
    ref = reference(params, idx, y, cfg.lr)
    torch._dynamo.reset()
    timer = Timer(device)
    log(f"[{size.name}] B={B:,} T={size.T} E={size.E} H={size.H} V={size.V}; data: {source}")

    arms: list[Arm] = []
    results: list[ArmResult] = []
    for make in arm_factories:
        arm = make()
        r = ArmResult(arm.name, arm.label, arm.description)
        results.append(r)
        ok, why = arm.available(device)
        if not ok:
            r.status, r.reason = "SKIPPED", why
            log(f"  {arm.name:16s} SKIPPED ({why})")
            continue
        t0 = time.perf_counter()
        try:
            arm.setup(params, size, idx, y, cfg.lr)
            r.gate = _check_arm(arm, params, idx, y, ref, cfg.lr)
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

    by_name = {r.name: r for r in results}
    plan = [(a, m) for m in MEASUREMENTS for a in arms if m in a.measurements]
    repeats = 0
    contention: dict = {}
    if time_it and plan:
        gc.collect()
        # warm-up rounds, also used to size the blocks and the number of timed rounds
        first: dict[tuple[str, str], float] = {}
        for _ in range(cfg.warmup_rounds):
            for a, m in plan:
                first[(a.name, m)] = _run_measurement(a, m, idx, y, timer)
        inner = {k: choose_inner(t, k[1], cfg.block_s) for k, t in first.items()}
        round_s = sum(first[k] * inner[k] for k in first)
        repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(round_s, 1e-9))))
        for (name, m), n in inner.items():
            by_name[name].inner[m] = n
        samples: dict[tuple[str, str], list[float]] = {(a.name, m): [] for a, m in plan}
        gc_was = gc.isenabled()
        cont = Contention()
        kept = dropped = 0
        rep = 0
        # rounds during which other processes used the CPU are dropped and redone (up to
        # 3x the planned number of rounds in all); if too few clean rounds come, the
        # dropped ones are used too and the size is flagged as contended
        spare: dict[tuple[str, str], list[float]] = {k: [] for k in samples}
        phase_start = cont.snapshot()
        while kept < repeats and rep < 3 * repeats:
            if rep % 50 == 0:  # a full collection costs ~50 ms with compiled code loaded
                gc.collect()
            gc.disable()
            this: dict[tuple[str, str], float] = {}
            before = cont.snapshot()
            try:
                for m in MEASUREMENTS:
                    row = [a for a in arms if m in a.measurements]
                    k = rep % len(row) if row else 0
                    for a in row[k:] + row[:k]:  # rotate the order each round
                        this[(a.name, m)] = _run_measurement(a, m, idx, y, timer, inner[(a.name, m)])
            finally:
                if gc_was:
                    gc.enable()
            after = cont.snapshot()
            target = samples if cont.clean(before, after) else spare
            for key, t in this.items():
                target[key].append(t)
            if target is samples:
                kept += 1
            else:
                dropped += 1
            rep += 1
        others, capacity = cont.others(phase_start, cont.snapshot())
        contended = kept < repeats
        if contended:
            for key in samples:
                samples[key].extend(spare[key])
        for (name, m), s in samples.items():
            by_name[name].samples[m] = s
            by_name[name].times[m] = summarize(s)
        contention = {"kept_rounds": kept, "dropped_rounds": dropped, "contended": contended,
                      "others_cpu_share": others / max(capacity, 1)}
        log(f"  timed {kept} clean rounds (round {round_s * 1e3:.1f} ms); dropped {dropped} during which other "
            f"processes ran; others' CPU share {100 * contention['others_cpu_share']:.1f}%"
            + (" -- CONTENDED: not enough clean rounds, all rounds used" if contended else ""))
    if cfg.memory:
        for a in arms:
            a.load(params)
            a.zero_grad()
            try:
                a.train_step(idx, y)  # warm (compiles, first-call allocations) before measuring
                by_name[a.name].peak_memory_bytes = peak_memory(lambda: a.train_step(idx, y), device)
            except Exception as e:  # pragma: no cover - profiler trouble
                log(f"  {a.name}: memory measurement failed: {e}")
    if cfg.memory and device.type == "cpu" and size.name in cfg.rss_sizes:
        probe = [a.name for a in arms if a.name in ARMS]
        for name, r in rss_memory(probe, size, cfg, log).items():
            by_name[name].rss = r
            by_name[name].rss_peak_bytes = r.get("peak_bytes")
        log("  RSS probes: " + ", ".join(f"{n} {fmt_bytes(by_name[n].rss_peak_bytes)}" for n in probe))
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


# --------------------------------------------------------------------------------------
# the whole suite
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def wait_quiet(max_wait_s: float, below: float = 0.5, log: Callable[[str], None] = print) -> bool:
    """Waits until the 1-minute load average drops below ``below`` (at most ``max_wait_s``)."""
    t0 = time.time()
    while True:
        load = _loadavg()
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
        "loadavg_start": _loadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda_runtime"] = torch.version.cuda
    return env


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
    out["sgemm_start"] = measure_sgemm_peak(cfg.device, repeats=3 if cfg.quick else 7,
                                            n=512 if cfg.quick else None)
    log(f"SGEMM peak: {out['sgemm_start']['gflops']:.1f} GFLOP/s (n={out['sgemm_start']['n']})")
    out["sizes"] = [bench_size(s, [registry[n] for n in names], cfg, log) for s in sizes]
    out["sgemm_end"] = measure_sgemm_peak(cfg.device, repeats=3 if cfg.quick else 7,
                                          n=512 if cfg.quick else None)
    out["environment"]["loadavg_end"] = _loadavg()
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


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    if b < 1 << 20:
        return f"{b / 1024:.1f} KiB"
    return f"{b / (1 << 20):.1f} MiB"


def _arm_map(size_res: dict) -> dict[str, dict]:
    return {a["name"]: a for a in size_res["arms"]}


def _median(arm: dict | None, m: str) -> float | None:
    if not arm or arm["status"] != "PASS":
        return None
    t = arm["times"].get(m)
    return t.get("median_s") if t and t.get("n") else None


def _size_label(s: dict) -> str:
    z = s["size"]
    fam = s["name"].split("-")[0]
    return f"{fam} (T={z['T']},E={z['E']},H={z['H']}) B={s['B']:,}"


def _status_cell(arm: dict | None) -> str:
    if arm is None:
        return "-"
    if arm["status"] == "PASS":
        return ""
    return arm["status"]


def time_table(res: dict, m: str) -> list[str]:
    arms = res["arms"]
    head = ["size"] + [f"{_label(res, a)}" for a in arms]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    extra = []
    if "charmlp" in arms and "compile" in arms:
        extra.append(("charmlp vs compile", "charmlp", "compile"))
    head += [e[0] for e in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sizes"]:
        am = _arm_map(s)
        base = _median(am.get(ref), m)
        row = [_size_label(s)]
        for a in arms:
            t = _median(am.get(a), m)
            if t is None:
                st = _status_cell(am.get(a))
                row.append(st if st else "n/a")
                continue
            sp = f" ({base / t:.2f}x)" if base else ""
            iqr = am[a]["times"][m].get("iqr_s", 0.0)
            row.append(f"{fmt_time(t)} ±{100 * iqr / t / 2:.0f}%{sp}")
        for _, num, den in extra:
            tn, td = _median(am.get(num), m), _median(am.get(den), m)
            row.append(f"{td / tn:.2f}x" if tn and td else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _label(res: dict, name: str) -> str:
    for s in res["sizes"]:
        for a in s["arms"]:
            if a["name"] == name:
                return a["label"]
    return name


def roofline_table(res: dict) -> list[str]:
    peak = res["sgemm_peak_gflops"]
    arms = res["arms"]
    head = ["size", "step GFLOP", "floor at SGEMM peak"] + [_label(res, a) for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sizes"]:
        am = _arm_map(s)
        fl = s["flops_step"]
        row = [_size_label(s), f"{fl / 1e9:.3f}", fmt_time(fl / (peak * 1e9))]
        for a in arms:
            t = _median(am.get(a), "step")
            row.append(f"{fl / t / 1e9:.1f} GFLOP/s ({100 * fl / t / 1e9 / peak:.1f}%)" if t else (_status_cell(am.get(a)) or "n/a"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def memory_table(res: dict, key: str = "peak_memory_bytes") -> list[str]:
    arms = res["arms"]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    head = ["size"] + [_label(res, a) for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sizes"]:
        am = _arm_map(s)
        if not any((am.get(a) or {}).get(key) is not None for a in arms):
            continue
        base = (am.get(ref) or {}).get(key)
        row = [_size_label(s)]
        for a in arms:
            b = (am.get(a) or {}).get(key)
            if b is None:
                row.append(_status_cell(am.get(a)) or "n/a")
                continue
            row.append(fmt_bytes(b) + (f" ({b / base:.2f}x)" if base else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def gate_table(res: dict) -> list[str]:
    arms = res["arms"]
    head = ["size"] + [_label(res, a) for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sizes"]:
        am = _arm_map(s)
        row = [_size_label(s)]
        for a in arms:
            r = am.get(a)
            if r is None:
                row.append("-")
            elif r["status"] in ("PASS", "FAILED"):
                worst = max(r["gate"].values()) if r["gate"] else math.nan
                row.append(f"{r['status']} ({worst:.1e})")
            else:
                row.append(f"{r['status']}: {r['reason'][:60]}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(res: dict) -> list[tuple[str, str, str]]:
    """The performance issue's targets, evaluated on this run: (target, measured, verdict)."""
    out = []
    byname = {s["name"]: _arm_map(s) for s in res["sizes"]}

    def ratio(size, num, den, m="step"):
        am = byname.get(size)
        if not am:
            return None
        a, b = _median(am.get(num), m), _median(am.get(den), m)
        return a / b if a and b else None

    def add(text, value, ok, fmt="{:.2f}x"):
        if value is None:
            out.append((text, "not measured", "-"))
        else:
            out.append((text, fmt.format(value), "met" if ok(value) else "NOT met"))

    if res["environment"]["device"].startswith("cuda"):
        add("B=32 training step >= 10x faster than seed eager", ratio("lecture-32", "seed", "charmlp"), lambda v: v >= 10)
        g = ratio("lecture-32", "seed", "charmlp-graph")
        add("B=32 training step >= 10x (CUDA-graph charmlp)", g, lambda v: v >= 10)
        am = byname.get("lecture-full")
        for arm in ("charmlp", "charmlp-graph"):
            t = _median(am.get(arm), "fwd_bwd") if am else None
            add(f"full batch forward+backward <= 0.5 ms ({arm})", t * 1e3 if t else None, lambda v: v <= 0.5, "{:.3f} ms")
        return out
    for size, want in (("lecture-32", 6), ("lecture-4096", 6), ("lecture-full", 10)):
        add(f"{size}: training step >= {want}x faster than seed eager", ratio(size, "seed", "charmlp"), lambda v, w=want: v >= w)
    for s in res["sizes"]:
        if s["name"].startswith("lecture"):
            add(f"{s['name']}: training step faster than torch.compile", ratio(s["name"], "compile", "charmlp"), lambda v: v > 1)
    am = byname.get("lecture-full")
    if am:
        key = "rss_peak_bytes" if (am.get("seed") or {}).get("rss_peak_bytes") else "peak_memory_bytes"
        a = (am.get("charmlp") or {}).get(key)
        b = (am.get("seed") or {}).get(key)
        how = "resident-set growth" if key == "rss_peak_bytes" else "profiler tensor bytes"
        add(f"lecture-full: peak memory of a training step <= 0.25x seed eager ({how})",
            a / b if a is not None and b else None, lambda v: v <= 0.25)
    add("large-4096: training step >= 1.5x faster than seed eager", ratio("large-4096", "seed", "charmlp"), lambda v: v >= 1.5)
    return out


def ablation_table(abl: dict) -> list[str]:
    algos = abl["algorithms"]
    head = ["size"] + [f"{m} {a}" for m in ("fwd+bwd", "step") for a in algos] + ["fastest step", "auto picks fastest?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in abl["sizes"]:
        am = _arm_map(s)
        row = [_size_label(s)]
        for m in ("fwd_bwd", "step"):
            for a in algos:
                t = _median(am.get(f"charmlp-{a}"), m)
                row.append(fmt_time(t) if t else (_status_cell(am.get(f"charmlp-{a}")) or "-"))
        steps = {a: _median(am.get(f"charmlp-{a}"), "step") for a in ("direct", "folded")}
        steps = {a: t for a, t in steps.items() if t}
        if len(steps) == 2:
            best = min(steps, key=steps.get)
            auto = _median(am.get("charmlp-auto"), "step")
            gap = max(steps.values()) / steps[best]
            row.append(f"{best} ({gap:.2f}x)" if gap >= 1.05 else f"tie ({gap:.2f}x)")
            if not auto:
                row.append("-")
            elif auto <= 1.05 * steps[best]:
                row.append(f"yes ({auto / steps[best]:.2f}x of fastest)")
            else:
                row.append(f"no ({auto / steps[best]:.2f}x of fastest)")
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(res: dict, ablation: dict | None = None, plots: list[str] | None = None,
                    command: str | None = None) -> str:
    env = res["environment"]
    bi = env["charmlp_build_info"]
    L = ["# charmlp benchmark results", ""]
    if command:
        L += [f"Command: `{command}`", ""]
    L += [
        f"- date: {env['date']}; total run time {res.get('total_s', res['elapsed_s']):.0f} s",
        f"- device: `{env['device']}`" + (f" ({env['gpu']}, CUDA {env['cuda_runtime']})" if "gpu" in env else ""),
        f"- CPU: {env['cpu_model']}, {env['cpu_count']} logical CPUs; **torch threads: {env['threads']}** "
        f"(interop {env['interop_threads']})" + (f"; {env['env']}" if env["env"] else ""),
        f"- **charmlp CPU kernels: {env.get('cpu_capability', bi.get('cpu_capability', '?'))}** (of "
        f"{', '.join(bi.get('cpu_capabilities_supported', []))} this CPU runs; `charmlp@X` arms switch to X)",
        f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')} "
        "(anything else running on the machine shows up here and in the timings)",
        f"- torch {env['torch']}, Python {env['python']}",
        f"- charmlp {env['charmlp']} build: " + ", ".join(f"{k}={v}" for k, v in bi.items()),
        f"- SGEMM peak (float32 {res['sgemm_start']['n']}^3 matmul, median): start {res['sgemm_start']['gflops']:.1f}, "
        f"end {res['sgemm_end']['gflops']:.1f} GFLOP/s; roofline uses {res['sgemm_peak_gflops']:.1f} GFLOP/s",
        f"- a timed sample is a block of back-to-back calls of one arm lasting about "
        f"{1e3 * res['config'].get('block_s', 0):.1f} ms (per-call time = block time / calls; a backward is always "
        "timed alone; `--block-ms 0` = one call per sample), so small sizes show the steady state of a training loop "
        "rather than the cost of a lone call after other arms ran; calls per block are in results.json (`inner`)\n"
        f"- each cell: median over the timed rounds ±half the inter-quartile range (% of the median), and "
        f"(speedup vs {REFERENCE_ARM} eager = its median / this median). Arms run interleaved, each round in a "
        f"rotated order, all on the same batch and the same starting weights. Rounds during which other processes "
        f"used more than 5% of the CPUs (/proc/stat) are dropped and redone; clean rounds per size (dropped): "
        + ", ".join(f"{s['name']} {s.get('contention', {}).get('kept_rounds', s['repeats'])}"
                    f" ({s.get('contention', {}).get('dropped_rounds', 0)})" for s in res["sizes"]),
        f"- data: " + "; ".join(sorted({s["data"] for s in res["sizes"]})),
        "",
    ]
    busy = [x for x in (env.get("loadavg_start"), env.get("loadavg_end")) if x]
    contended = [s["name"] for s in res["sizes"] if s.get("contention", {}).get("contended")]
    if contended:
        L += [f"> **Warning:** too few clean rounds at {', '.join(contended)}: other processes kept using the "
              "CPUs, so those rows include contended rounds and are not trustworthy. Rerun on a quiet machine.", ""]
    elif env["device"] == "cpu" and busy and max(b[0] for b in busy) > 0.5 * max(env["threads"], 1) \
            and not any("contention" in s for s in res["sizes"]):
        L += [f"> **Warning:** other work was running on this machine during the run (1-minute load average "
              f"{', '.join(str(b[0]) for b in busy)} on {env['cpu_count']} CPUs). CPU timings of multi-threaded "
              "ops degrade badly when their threads share cores with other processes; treat these numbers as noisy "
              "and rerun on a quiet machine (`--wait-quiet`).", ""]
    tg = targets(res)
    if tg:
        L += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in tg]
        L += [""]
    for m in ("step", "forward", "backward", "fwd_bwd"):
        L += [f"## {MEASUREMENT_LABELS[m].capitalize()}", ""]
        L += time_table(res, m)
        L += [""]
        if m == "step" and plots:
            L += [f"![{p}]({p})" for p in plots] + [""]
    L += ["## Roofline: training step throughput", "",
          f"FLOPs of a training step = 6·B·H·(T·E+V) (the unfused algorithm's two GEMMs, forward and backward); "
          f"% = fraction of the SGEMM peak measured in this run ({res['sgemm_peak_gflops']:.1f} GFLOP/s). "
          "charmlp does less arithmetic than this count (the folded embedding; on CPU its training step also "
          "runs once per distinct context of the batch, with the rows' target counts), so its figure can exceed "
          "the peak: read it as effective throughput.", ""]
    L += roofline_table(res) + [""]
    dev = env["device"]
    how = ("`torch.profiler` (profile_memory) peak of live tensor bytes allocated through PyTorch's CPU allocator "
           "during one training step, above what was live before it (the weights, inputs and anything the arm "
           "keeps between steps are not counted; MKL/oneDNN internal workspaces are not seen)"
           if not dev.startswith("cuda") else
           "`torch.cuda.max_memory_allocated()` during one training step minus `memory_allocated()` before it "
           "(a CUDA-graph arm allocates nothing at replay: its memory lives in the graph's private pool)")
    L += ["## Peak memory of a training step", ""]
    rss_rows = memory_table(res, "rss_peak_bytes")
    if len(rss_rows) > 2:
        L += ["**Resident-set growth** of the arm's first training step at this size, each arm in a fresh process "
              "(baseline just before the step: imports, batch, weights, setup and one 32-row warm-up step done; "
              "compile arms also one step at this size, so compilation is excluded; glibc set to return every "
              "freed block >= 64 KiB to the OS so RSS follows live memory; peak from VmHWM after resetting it via "
              "/proc/self/clear_refs). It counts everything the step needs: activations, gradients, kernels' "
              f"scratch kept between calls, library buffers. Ratio vs {REFERENCE_ARM} eager in brackets.", ""]
        L += rss_rows + [""]
    caveat = ("charmlp's fused kernels keep their scratch in per-thread buffers outside PyTorch's allocator, so this "
              "column understates charmlp; the resident-set table above is the one to quote."
              if not dev.startswith("cuda") else
              "charmlp's CUDA kernels allocate all scratch through PyTorch's caching allocator, so every arm's "
              "device memory is counted.")
    L += [f"**Tensor allocations** during a warm training step: {how}. Ratio vs {REFERENCE_ARM} eager in brackets. "
          + caveat, ""]
    L += memory_table(res) + [""]
    L += ["## Correctness gate", "",
          "Before timing, each arm's loss and five gradients (forward + backward), and the loss and the update of "
          f"one training step (SGD, lr={res['config']['lr']}; the applied gradient is recovered as "
          "(before - after) / lr), are compared with a float64 evaluation of the seed notebook's code on the same "
          "float32 weights and batch. Error = max |arm - reference| / max |reference| per tensor; limits: "
          + ", ".join(f"{k} {v:.0e}" for k, v in res["gate_rtol"].items())
          + ". A FAILED or ERROR arm is not timed. Cell: status (worst error).", ""]
    L += gate_table(res) + [""]
    L += ["## Arms", ""]
    seen = set()
    for s in res["sizes"]:
        for a in s["arms"]:
            if a["name"] not in seen:
                seen.add(a["name"])
                L.append(f"- **{a['label']}** (`{a['name']}`): {a['description']}")
    L += [""]
    setup = []
    for s in res["sizes"]:
        am = _arm_map(s)
        cells = [f"{n} {am[n]['setup_s']:.1f}s" for n in res["arms"] if n in am and am[n]["status"] in ("PASS", "FAILED")]
        setup.append(f"{s['name']}: " + ", ".join(cells))
    L += ["Setup + gate time per arm (includes torch.compile's compilation): " + "; ".join(setup), ""]
    if res.get("output_layer_table"):
        L += ["## Output layer alone: F.linear + F.cross_entropy vs charmlp", "",
              "Op-level (bench_output_layer.py): `torch` = F.cross_entropy(F.linear(h, W2, b2), y); `charmlp-ce` = "
              "charmlp.ops.cross_entropy after F.linear; `charmlp-lce` = charmlp.ops.linear_cross_entropy (logits never "
              "stored). h = the model's hidden states for the batch. Median time (speedup vs torch); fwd = the loss "
              "under torch.no_grad() (with grad enabled charmlp-lce's forward also computes the gradients: the "
              "training cost is fwd+bwd); peak memory of forward + backward (gradients of h, W2, b2).", ""]
        L += res["output_layer_table"] + [""]
    if ablation:
        L += ["## Ablation: charmlp's CPU embedding algorithm", "",
              "`charmlp._C._set_embed_algorithm`: direct = gather rows, GEMM with W1; folded = P_j = table @ W1_j^T "
              "then a gather-sum per row; auto = the C++ cost model's pick. Gated and interleaved like the arms.", ""]
        L += ablation_table(ablation) + [""]
    return "\n".join(L) + "\n"


def plot_results(res: dict, outdir: Path) -> list[str]:
    """time-vs-batch (log-log, lecture size) and speedup bars; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # time vs batch for one model configuration: the lecture's, else the one with most sizes
    fams: dict[str, list] = {}
    for s in res["sizes"]:
        fams.setdefault(s["name"].rsplit("-", 1)[0], []).append(s)
    fam = "lecture" if "lecture" in fams else max(fams, key=lambda f: len(fams[f]), default=None)
    lect = sorted(fams.get(fam, []), key=lambda s: s["B"])
    arms = res["arms"]
    if lect:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
        for ax, m in zip(axes.flat, ("step", "fwd_bwd", "forward", "backward")):
            for a in arms:
                pts = [(s["B"], _median(_arm_map(s).get(a), m)) for s in lect]
                pts = [(b, t) for b, t in pts if t]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=_label(res, a))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{MEASUREMENT_LABELS[m]}, {_size_label(lect[0]).rsplit(' B=', 1)[0]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        if axes.flat[0].get_legend_handles_labels()[0]:
            axes.flat[0].legend(fontsize=8)
        env = res["environment"]
        fig.suptitle(f"charmlp vs PyTorch on {env['device']} ({env['cpu_model'] if env['device'] == 'cpu' else env.get('gpu', '')}, "
                     f"{env['threads']} threads)", fontsize=10)
        fig.tight_layout()
        fig.savefig(outdir / "time_vs_batch.png", dpi=110)
        plt.close(fig)
        files.append("time_vs_batch.png")
    # speedup bars: training step (and fwd+bwd) vs the reference, every size
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    others = [a for a in arms if a != ref]
    if others and res["sizes"]:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=False)
        for ax, m in zip(axes, ("step", "fwd_bwd")):
            n = len(others)
            width = 0.8 / n
            xs = range(len(res["sizes"]))
            for i, a in enumerate(others):
                vals = []
                for s in res["sizes"]:
                    am = _arm_map(s)
                    t, b = _median(am.get(a), m), _median(am.get(ref), m)
                    vals.append(b / t if t and b else 0.0)
                bars = ax.bar([x + (i - (n - 1) / 2) * width for x in xs], vals, width, label=_label(res, a))
                for bar, v in zip(bars, vals):
                    if v:
                        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
            ax.axhline(1.0, color="k", lw=0.8)
            pos = [v for bars in ax.containers for v in bars.datavalues if v > 0]
            if pos and max(pos) / min(pos) > 20:
                ax.set_yscale("log")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([s["name"].replace("lecture-", "L ").replace("large-", "XL ") for s in res["sizes"]],
                               fontsize=8)
            ax.set_ylabel(f"speedup vs {_label(res, ref)} (x)")
            ax.set_title(MEASUREMENT_LABELS[m])
            ax.grid(True, axis="y", alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "speedup.png", dpi=110)
        plt.close(fig)
        files.append("speedup.png")
    return files


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, torch.device):
        return str(o)
    return o


def write_report(res: dict, outdir: Path, ablation: dict | None = None, plots: bool = True,
                 command: str | None = None) -> dict[str, Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    if plots:
        try:
            files = plot_results(res, outdir)
        except ImportError as e:  # no matplotlib: the tables still get written
            print(f"plots skipped: {e}", file=sys.stderr)
    md = render_markdown(res, ablation, files, command)
    (outdir / "results.md").write_text(md)
    blob = dict(res)
    if ablation:
        blob["ablation"] = ablation
    (outdir / "results.json").write_text(json.dumps(_jsonable(blob), indent=1))
    out = {"md": outdir / "results.md", "json": outdir / "results.json"}
    out.update({f: outdir / f for f in files})
    return out


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up round, 2-3 timed rounds")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated sizes: names ({', '.join(SIZES)}) or T:E:H:V:B (default: {','.join(DEFAULT_SIZES)})")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated arms ({', '.join(ARMS)}); default: {','.join(DEFAULT_ARMS)} "
                        "(CUDA-only arms are skipped on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--budget", type=float, default=None, help="timed seconds per size (default 20, quick 0.5)")
    p.add_argument("--repeats", type=int, default=None, help="fixed number of timed rounds (overrides --budget)")
    p.add_argument("--block-ms", type=float, default=None,
                   help="a timed sample is a block of back-to-back calls of one arm lasting about this long "
                        "(default 1 ms; 0 = one call per sample, i.e. strict per-call interleaving)")
    p.add_argument("--data", default="names", help="names (names.txt when found, else random), random, or a word-list path")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--rss-sizes", default=None,
                   help="sizes whose step memory is also measured as resident-set growth in fresh processes "
                        "(CPU; default lecture-4096,lecture-full,large-4096 where run; 'none' for none)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    return p


def config_from_args(args) -> tuple[Config, list[Size], list[str] | None]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kw = {"data": args.data, "memory": not args.no_memory}
    cfg = Config.quick_config(device, threads, **kw) if args.quick else Config(device=device, threads=threads, **kw)
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.block_ms is not None:
        cfg.block_s = args.block_ms / 1e3
    if args.rss_sizes is not None:
        cfg.rss_sizes = tuple(parse_size(x).name for x in args.rss_sizes.split(",") if x and x != "none")
    if args.repeats is not None:
        cfg.min_repeats = cfg.max_repeats = args.repeats
    sizes = [parse_size(s) for s in (args.sizes.split(",") if args.sizes else DEFAULT_SIZES)]
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    return cfg, sizes, arms


def default_outdir(device: torch.device) -> Path:
    return HERE / "results" / device.type


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
    _a = json.loads(sys.argv[2])
    _r = rss_probe(_a["arm"], Size(**_a["size"]), _a["data"], _a["threads"], _a["lr"], _a["seed"])
    print(json.dumps(_r))
