"""Builds charmlp's CUDA sources for the CPU: the CUDA emulation used by
tests/test_cuda_emulated.py.

Why: the CUDA kernels compile here (tools/check_cuda_build.sh) but no GPU is at
hand to run them. This builds the very same files (csrc/cuda/*.cu kernels and
*_cuda.cpp host wrappers, csrc/ops.cpp schemas) with the host compiler against
small stand-ins for the CUDA runtime and nvcc's built-ins (include/), and registers
the result as ``torch.ops.charmlp_cuda_emu.<op>`` on CPU tensors. Tests then compare
each emulated op with charmlp's CPU op. It checks the kernels' index arithmetic,
reductions, shared-memory use and barriers (see cuda_emu.cpp for what is and is not
checked); it is no substitute for running on a GPU.

The only source change is mechanical, done by ``convert_cu``: ``k<<<g, b, s, st>>>(a)``
becomes ``::cuda_emu::launch([&](auto... x) { k(x...); }, id, g, b, s, st)(a)``, and
``__shared__`` declarations become per-block buffers.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emulation"


def _strip_line_comments(src: str) -> str:
    """Drops // comments (kept line breaks), so the launch rewrite never looks into one."""
    out = []
    for line in src.split("\n"):
        in_str = False
        cut = len(line)
        i = 0
        while i < len(line):
            c = line[i]
            if c == '"' and (i == 0 or line[i - 1] != "\\"):
                in_str = not in_str
            elif not in_str and line.startswith("//", i):
                cut = i
                break
            i += 1
        out.append(line[:cut])
    return "\n".join(out)


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>]+(?:\s+[\w:<>]+)*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def _split_top_level(args: str) -> list[str]:
    """Splits a launch configuration at the commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for c in args:
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        cur.append(c)
    parts.append("".join(cur))
    return parts


_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(\s*([^,()]+?)\s*(?:,[^()]*)?\)")


def _check_launch_bounds(src: str) -> str:
    """Opens each kernel declared with __launch_bounds__(N, ...) with a check that the
    launch has at most N threads per block (a GPU refuses such a launch)."""
    out, pos = [], 0
    for m in _LAUNCH_BOUNDS.finditer(src):
        body = src.index("{", m.end())  # a kernel's parameter list holds no brace
        out.append(src[pos : body + 1])
        out.append(f" ::cuda_emu::check_launch_bounds({m.group(1)});")
        pos = body + 1
    out.append(src[pos:])
    return "".join(out)


_KERNEL_NAME = re.compile(r"[A-Za-z_][\w:]*(?:<[^;{}()]*>)?")


def _rewrite_launches(src: str) -> str:
    out = []
    pos = 0
    while True:
        start = src.find("<<<", pos)
        if start < 0:
            out.append(src[pos:])
            return "".join(out)
        end = src.find(">>>", start)
        if end < 0:
            raise ValueError("unterminated <<<")
        # The kernel expression starts after the previous statement or brace.
        k = max(src.rfind(ch, 0, start) for ch in ";{}") + 1
        while src[k].isspace():
            k += 1
        kernel = src[k:start].strip()
        if not _KERNEL_NAME.fullmatch(kernel):
            # e.g. `if (c) k<<<...>>>(...)`: the rewrite would launch unconditionally.
            raise ValueError(f"cannot rewrite the launch of {kernel!r}: name the kernel on its own statement")
        config = src[start + 3 : end]
        parts = _split_top_level(config)
        # The kernel's address identifies it for the shared-memory opt-in check; only
        # launches with dynamic shared memory need it (and only those name a kernel
        # whose template arguments are all given, so that it has an address).
        has_smem = len(parts) >= 3 and parts[2].strip() != "0"
        kid = f"reinterpret_cast<const void*>({kernel})" if has_smem else "nullptr"
        out.append(src[pos:k])
        launch = f"::cuda_emu::launch([&](auto... a) {{ {kernel}(a...); }}, {kid}, {config})"
        # Same number of lines as the original, so #line keeps diagnostics on the .cu's lines.
        out.append(launch.replace("\n", " ") + "\n" * src[k : end + 3].count("\n"))
        pos = end + 3


def convert_cu(src: str, origin: str = "") -> str:
    """The host-compilable form of a .cu file (see the module docstring); `origin`, the
    file's path, for #line (compiler and sanitizer messages then name the .cu)."""
    src = _strip_line_comments(src)
    src = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::cuda_emu::dynamic_shared());", src)
    src = _STATIC_SHARED.sub(
        r"static const char \2_emu_site = 0; auto& \2 = ::cuda_emu::block_shared<\1\3>(&\2_emu_site);", src
    )
    if "__shared__" in src:
        raise ValueError("a __shared__ declaration the converter does not understand")
    src = _check_launch_bounds(src)
    src = _rewrite_launches(src)
    line = f'#line 1 "{origin}"\n' if origin else ""
    return '#include "cuda_emu_device.h"\n' + line + src


def sources() -> list[Path]:
    """Writes the converted kernel files under build/cuda_emulation and lists every source."""
    gen = BUILD / "gen" / "cuda"
    gen.mkdir(parents=True, exist_ok=True)
    out = [HERE / "cuda_emu.cpp", CSRC / "ops.cpp"]
    out += sorted((CSRC / "cuda").glob("*_cuda.cpp"))
    # Kernel headers land in gen/cuda/ under their own names: gen/ comes before csrc/
    # on the include path, so `#include "cuda/tiled_gemm.cuh"` finds the converted one.
    for cu in [*sorted((CSRC / "cuda").glob("*.cu*")), HERE / "selftest_kernels.cu"]:
        text = convert_cu(cu.read_text(), str(cu))
        dst = gen / (cu.name if cu.suffix == ".cuh" else cu.stem + "_cu.cpp")
        if not dst.exists() or dst.read_text() != text:  # keep ninja's incremental build
            dst.write_text(text)
        if cu.suffix == ".cu":
            out.append(dst)
    return out


def load(verbose: bool = False, sanitize: bool = False) -> None:
    """Builds (incrementally) and loads the emulated library; its ops appear under
    torch.ops.charmlp_cuda_emu.

    sanitize=True builds it with AddressSanitizer, so that any out-of-bounds access by a
    kernel or host wrapper to a tensor (each a separate heap block with red zones around
    it) aborts with a report. The process must then run with ASan's runtime preloaded
    (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``, ``ASAN_OPTIONS=detect_leaks=0``):
    see test_cuda_emulated.py."""
    from torch.utils import cpp_extension

    srcs = sources()
    # One build directory per set of sources' paths and flavour (ninja handles content changes).
    tag = hashlib.sha1("\n".join(map(str, srcs)).encode()).hexdigest()[:8]
    build_dir = BUILD / f"ninja-{tag}{'-asan' if sanitize else ''}"
    build_dir.mkdir(parents=True, exist_ok=True)
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cpp_extension.load(
        name="charmlp_cuda_emu_asan" if sanitize else "charmlp_cuda_emu",
        sources=[str(s) for s in srcs],
        extra_include_paths=[str(HERE / "include"), str(BUILD / "gen"), str(CSRC)],
        extra_cflags=[
            "-O1",
            "-std=c++20",
            "-fvisibility=hidden",
            "-Wno-unknown-pragmas",
            "-include",
            str(HERE / "include" / "cuda_emu_prelude.h"),
            *asan,
        ],
        extra_ldflags=asan,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    load(verbose=True, sanitize="--asan" in sys.argv)
    import torch

    print("emulated ops:", sorted(n for n in dir(torch.ops.charmlp_cuda_emu) if not n.startswith("_")))
