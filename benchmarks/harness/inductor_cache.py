"""One TorchInductor cache per ``ATEN_CPU_CAPABILITY``, so posing as an AVX2 host cannot
crash the next native run.

``ATEN_CPU_CAPABILITY=avx2`` (the AVX2-host recipe in ``benchmarks/README.md``) makes
Inductor generate C++ kernels for 8-wide vectors, but torch 2.13's FX-graph cache key does
not include the vector ISA: the next process without the variable finds that cached code
and compiles it with AVX-512 headers (16-wide ``Vectorized``): the ``compile`` arm dies with
``double free or corruption`` or ``malloc(): unaligned tcache chunk``, and a compiled
``F.cross_entropy`` alone returned ``-inf``. Plain PyTorch shows it (compile a model once
with ``ATEN_CPU_CAPABILITY=avx2``, then run it without); charmlp is not involved. Giving each
capability its own cache directory avoids it in both directions. ``TORCHINDUCTOR_CACHE_DIR``
is Inductor's documented setting and is read when a compilation first touches the cache, so
this must run before any ``torch.compile`` call: the harness does it on import.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile

#: The variable Inductor takes its cache directory from, and the one that changes its
#: generated code without changing its cache key.
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"


def isolate_inductor_cache() -> str | None:
    """Point Inductor at a cache of its own when ``ATEN_CPU_CAPABILITY`` is set and the
    user has not chosen a cache directory. Returns the directory set, or None."""
    capability = os.environ.get(CAPABILITY_ENV, "").strip().lower()
    if not capability or CACHE_DIR_ENV in os.environ:
        return None
    tag = re.sub(r"[^a-z0-9_]", "_", capability)
    try:
        user = re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())
    except (KeyError, OSError):
        user = "user"
    path = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_aten_{tag}")
    os.environ[CACHE_DIR_ENV] = path
    return path
