"""Loads the native extension and refuses a torch it was not built against.

A PyTorch C++ extension is tied to the exact torch it was compiled with (C++ ABI,
dispatcher internals). Loading it under another torch fails with an obscure
undefined-symbol error, or worse, loads and misbehaves; this module turns both
cases into one clear ImportError that says how to rebuild.
"""

from __future__ import annotations

import os

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


def build_info() -> dict:
    """How the extension was built: torch version, CUDA and arch list, OpenMP, compiler,
    the CPU kernels' capabilities (compiled, supported here, and ``cpu_capability``: in use)."""
    return {**BUILD_INFO, "cpu_capability": cpu_capability()}


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (they still need a GPU to run)."""
    return bool(BUILD_INFO["cuda"])
