"""Loads the native extension and refuses a torch it was not built against.

A PyTorch C++ extension is tied to the exact torch it was compiled with (C++ ABI,
dispatcher internals). Loading it under another torch fails with an obscure
undefined-symbol error, or worse, loads and misbehaves; this module turns both
cases into one clear ImportError that says how to rebuild.
"""

from __future__ import annotations

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


def build_info() -> dict:
    """How the extension was built: torch version, CUDA and arch list, OpenMP, compiler, SIMD."""
    return dict(BUILD_INFO)


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (they still need a GPU to run)."""
    return bool(BUILD_INFO["cuda"])
