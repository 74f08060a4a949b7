"""Loads the native extension and refuses a torch it was not built against.

A PyTorch C++ extension is tied to the exact torch it was compiled with (C++ ABI,
dispatcher internals). Loading it under another torch fails with an obscure
undefined-symbol error, or worse, loads and misbehaves; this module turns both
cases into one clear ImportError that says how to rebuild.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_REBUILD = (
    "Rebuild charmlp against the torch you have: from the charmlp source folder run "
    "`pip install --no-build-isolation --force-reinstall --no-deps .`"
)

try:
    from . import _C  # noqa: F401  (registers the charmlp::* operators)
except ImportError as exc:  # pragma: no cover - depends on a broken install
    raise ImportError(
        f"charmlp's native extension could not be loaded under torch {torch.__version__}: {exc}. "
        + _REBUILD
    ) from exc

BUILD_INFO: dict = _C.build_info()

if BUILD_INFO["torch_version"] != torch.__version__:
    raise ImportError(
        f"charmlp was built against torch {BUILD_INFO['torch_version']} but torch "
        f"{torch.__version__} is installed. " + _REBUILD
    )


CPU_CAPABILITY_ENV = "CHARMLP_CPU_CAPABILITY"


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with: ``"default"``, ``"avx2"`` or ``"avx512"``.

    The kernels are compiled once per capability (``build_info()["cpu_capabilities"]``)
    and the best one this CPU supports is chosen when charmlp is imported, unless the
    environment variable ``CHARMLP_CPU_CAPABILITY`` names another.
    """
    return _C._cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Runs every op's CPU kernels compiled for ``name`` from the next call on.

    Raises ValueError if this build did not compile ``name`` or this CPU cannot run it.
    Meant for comparing the capabilities' speed (the benchmarks) and testing each of them;
    results agree within the ops' tolerances, not bit for bit.
    """
    if not isinstance(name, str):
        raise TypeError(f"charmlp.set_cpu_capability: name must be a str, got {type(name).__name__}")
    _C._set_cpu_capability(name)


def _apply_cpu_capability_env() -> None:
    name = os.environ.get(CPU_CAPABILITY_ENV)
    if not name:
        return
    try:
        _C._set_cpu_capability(name)
    except ValueError as exc:
        raise ImportError(f"charmlp: {CPU_CAPABILITY_ENV}={name!r} cannot be used: {exc}") from exc


_apply_cpu_capability_env()


KERNEL_IMPLS = ("fast", "naive")


def kernel_impl() -> str:
    """The kernels ``embed_linear_tanh`` and ``cross_entropy`` run with: ``"fast"`` (the
    default) or ``"naive"`` (see :func:`set_kernel_impl`)."""
    return _C._kernel_impl()


def _check_kernel_impl(caller: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"charmlp.{caller}: name must be a str, got {type(name).__name__}")
    if name not in KERNEL_IMPLS:
        raise ValueError(f"charmlp.{caller}: name must be 'fast' or 'naive', got {name!r}")
    return name


def set_kernel_impl(name: str) -> None:
    """Runs ``embed_linear_tanh`` and ``cross_entropy`` with the ``"fast"`` kernels (the
    default) or the ``"naive"`` ones, from the next call on.

    The naive kernels are the first stop of the kernel tour: each op as plain loops on CPU
    (``csrc/cpu/naive/``) and one thread per output element on CUDA
    (``csrc/cuda/*_naive.cu``), each readable in one screen, with the same arguments,
    checks (index bounds included) and results within rounding, and many times slower.
    The switch covers the forwards and the backwards autograd calls
    (``embed_linear_tanh_backward``, ``cross_entropy_backward``,
    ``cross_entropy_and_grads``), on CPU and CUDA, wherever they are called from (the
    modules, ``torch.ops.charmlp``). The other ops -- ``linear_cross_entropy`` and the
    whole-model ops (``mlp_cross_entropy``, ``mlp_logits_cross_entropy``, ``mlp_sgd_step(s)``)
    -- have no naive version and always run their fast kernels.

    Process-wide (every thread), like :func:`set_cpu_capability`. Raises ValueError for a
    name other than ``"fast"`` or ``"naive"``. See :func:`use_kernel_impl` for a scoped switch.
    """
    _C._set_kernel_impl(_check_kernel_impl("set_kernel_impl", name))


@contextlib.contextmanager
def _kernel_impl_scope(name: str) -> Iterator[str]:
    prev = kernel_impl()
    _C._set_kernel_impl(name)
    try:
        yield name
    finally:
        _C._set_kernel_impl(prev)


def use_kernel_impl(name: str) -> contextlib.AbstractContextManager[str]:
    """``with charmlp.use_kernel_impl("naive"): ...`` runs the block under
    :func:`set_kernel_impl` ``(name)`` and restores the previous choice on exit (also on an
    exception). Raises ValueError at once for a bad name."""
    return _kernel_impl_scope(_check_kernel_impl("use_kernel_impl", name))


def build_info() -> dict:
    """How the extension was built: torch version, CUDA and arch list, OpenMP, compiler,
    the CPU kernels' capabilities (compiled, supported here, and ``cpu_capability``: in use),
    and ``kernel_impl``: the kernels in use (:func:`set_kernel_impl`)."""
    return {**BUILD_INFO, "cpu_capability": cpu_capability(), "kernel_impl": kernel_impl()}


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (they still need a GPU to run)."""
    return bool(BUILD_INFO["cuda"])
