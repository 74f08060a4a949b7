"""The arms: the same model computed each way the suite compares, from the same float32 weights.

Plain PyTorch comes from ``charmlp.reference`` (the model written down once): the seed arm
runs its ``notebook_loss`` / ``notebook_step`` (the lecture notebook's raw-tensor code), the
``functional`` and compile arms its ``MLP`` module (``F.embedding`` / ``F.linear``).
"""

from __future__ import annotations

import inspect
import types
from typing import Callable

import torch
from torch import Tensor, nn

import charmlp
from charmlp import reference as R

from .sizes import MEASUREMENTS, PARAM_NAMES, Size


class Arm:
    """One way of computing the model. Subclasses implement the hooks below.

    ``forward`` returns the loss with the autograd graph recorded (the forward of a
    training step); ``backward`` consumes it; ``zero_grad`` clears gradients so
    ``backward`` starts clean; ``fwd_bwd`` is both, gradients cleared first; ``train_step``
    is the whole step the way the arm's user would write it (its own gradient zeroing
    included) and returns the loss.
    """

    name = "arm"
    label = "arm"
    description = ""
    cuda_only = False
    #: measurements this arm supports (others are reported as n/a)
    measurements: tuple[str, ...] = MEASUREMENTS
    #: canonical names whose tensor the arm keeps transposed (the notebook's W1 [T*E, H], W2 [H, V])
    transposed: frozenset = frozenset()

    def available(self, device: torch.device) -> tuple[bool, str]:
        if self.cuda_only and device.type != "cuda":
            return False, "needs a CUDA device"
        return True, ""

    def setup(self, params: dict[str, Tensor], size: Size, idx: Tensor, y: Tensor, lr: float) -> None:
        raise NotImplementedError

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

    def fwd_bwd(self, idx: Tensor, y: Tensor) -> Tensor:
        self.zero_grad()
        loss = self.forward(idx, y)
        self.backward(loss)
        return loss

    def train_step(self, idx: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class SeedArm(Arm):
    """The seed notebook's code: ``charmlp.reference.notebook_loss`` / ``notebook_step``."""

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
        self.C = params["table"].clone().requires_grad_()
        self.W1 = params["W1"].T.contiguous().requires_grad_()
        self.b1 = params["b1"].clone().requires_grad_()
        self.W2 = params["W2"].T.contiguous().requires_grad_()
        self.b2 = params["b2"].clone().requires_grad_()
        self.parameters = [self.C, self.W1, self.b1, self.W2, self.b2]

    def _tensors(self):
        return {"table": self.C, "W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}

    def forward(self, X, Y):
        return R.notebook_loss(self.parameters, X, Y)

    def train_step(self, X, Y):
        return R.notebook_step(self.parameters, X, Y, self.lr)


def reference_module(params: dict[str, Tensor]) -> R.MLP:
    """``charmlp.reference.MLP`` (``F.embedding`` / ``F.linear``, nn.Linear layout) on copies of the weights."""
    return R.MLP(*(params[k] for k in PARAM_NAMES))


class FunctionalArm(Arm):
    name = "functional"
    label = "eager F.*+SGD"
    description = (
        "An `nn.Module` using `F.embedding`, `F.linear`, `torch.tanh`, `F.cross_entropy` (weights in nn.Linear "
        "layout); step: `opt.zero_grad()`, forward, `loss.backward()`, `opt.step()` with `torch.optim.SGD(lr)` "
        "(PyTorch's default implementation choice for the device)."
    )

    def setup(self, params, size, idx, y, lr):
        self.model = reference_module(params)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def _tensors(self):
        m = self.model
        return {"table": m.table, "W1": m.weight1, "b1": m.bias1, "W2": m.weight2, "b2": m.bias2}

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
        self.model = reference_module(params)
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
