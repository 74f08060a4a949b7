"""Runtime instruction-set dispatch of the CPU kernels (csrc/cpu/capability.h).

* the capabilities are reported, chosen, switched and forced (CHARMLP_CPU_CAPABILITY) with
  clear errors for bad values;
* every op gives the same results under every capability this CPU runs (within the ops'
  tolerances) and bitwise the same results when repeated under one capability;
* the op test files run whole under each capability other than the one chosen at load
  (a subprocess with CHARMLP_CPU_CAPABILITY forced), so an AVX-512 host tests the AVX2 and
  baseline kernels with every case it tests the AVX-512 ones with;
* the library's machine code holds no AVX or AVX-512 instruction that code for an older
  CPU could reach (the copies share inline functions of torch's and the standard library's
  headers: a wrong link order would hand the baseline kernels an AVX-512 copy).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import charmlp
from charmlp import _C, reference

from conftest import assert_all_bitwise

INFO = charmlp.build_info()
COMPILED = INFO["cpu_capabilities"]
SUPPORTED = INFO["cpu_capabilities_supported"]
CHOSEN_AT_LOAD = _C._cpu_capability()
TESTS = Path(__file__).resolve().parent


def platform_is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@pytest.fixture(params=SUPPORTED)
def capability(request):
    """Runs a test under each capability this CPU runs, restoring the one in use after."""
    prev = charmlp.cpu_capability()
    charmlp.set_cpu_capability(request.param)
    yield request.param
    charmlp.set_cpu_capability(prev)


# --------------------------------------------------------------------------------------
# reporting, choosing and forcing
# --------------------------------------------------------------------------------------


def test_build_info_reports_the_capabilities():
    assert COMPILED[0] == "default"
    assert set(SUPPORTED) <= set(COMPILED) and "default" in SUPPORTED
    assert INFO["cpu_capability"] in SUPPORTED
    if platform_is_x86_64():
        # a default build compiles every x86-64 capability (CHARMLP_CPU_CAPABILITIES)
        assert COMPILED == ["default", "avx2", "avx512"]
    assert "-march=native" not in INFO["cxx_flags"] + INFO["cpu_capability_flags"]


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo")
def test_supported_capabilities_follow_the_cpu_flags():
    flags = cpu_flags()
    if "avx2" in COMPILED:
        assert ("avx2" in SUPPORTED) == ({"avx2", "fma", "f16c"} <= flags)
    if "avx512" in COMPILED:
        assert ("avx512" in SUPPORTED) == ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                            "avx512dq"} <= flags)


def test_the_best_supported_capability_is_chosen_at_load():
    if os.environ.get("CHARMLP_CPU_CAPABILITY"):
        pytest.skip("CHARMLP_CPU_CAPABILITY forces the choice in this process")
    assert CHOSEN_AT_LOAD == SUPPORTED[-1]


def test_set_cpu_capability_switches_and_rejects_bad_values(capability):
    assert charmlp.cpu_capability() == capability
    assert charmlp.build_info()["cpu_capability"] == capability
    with pytest.raises(ValueError, match=r"must be one of 'default'.*got 'avx1024'"):
        charmlp.set_cpu_capability("avx1024")
    with pytest.raises(TypeError, match="name must be a str, got int"):
        charmlp.set_cpu_capability(2)
    assert charmlp.cpu_capability() == capability  # a refused switch changes nothing


def test_a_capability_this_cpu_lacks_is_refused():
    missing = [c for c in COMPILED if c not in SUPPORTED]
    if not missing:
        pytest.skip("this CPU runs every compiled capability")
    with pytest.raises(ValueError, match=f"'{missing[0]}' is not supported by this CPU"):
        charmlp.set_cpu_capability(missing[0])


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_environment_variable_forces_a_capability(name):
    r = _python("import charmlp; print(charmlp.cpu_capability(), charmlp.build_info()['cpu_capability'])",
                CHARMLP_CPU_CAPABILITY=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, name]


def test_a_bad_environment_value_is_a_clear_import_error():
    r = _python("import charmlp", CHARMLP_CPU_CAPABILITY="avx9")
    assert r.returncode != 0
    assert "ImportError: charmlp: CHARMLP_CPU_CAPABILITY='avx9' cannot be used" in r.stderr, r.stderr
    assert "must be one of 'default'" in r.stderr


# --------------------------------------------------------------------------------------
# the same numbers under every capability
# --------------------------------------------------------------------------------------


def _every_op(dtype: torch.dtype, B: int = 67, T: int = 3, E: int = 10, H: int = 45, V: int = 27):
    """Values and gradients of every op family at an odd-sized shape (ragged vector tails,
    uneven GEMM row blocks), as a flat list of tensors."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B,), generator=g)
    y[::11] = -100
    table = torch.randn(V, E, generator=g, dtype=dtype, requires_grad=True)
    W1 = (torch.randn(H, T * E, generator=g, dtype=dtype) / (T * E) ** 0.5).requires_grad_()
    b1 = torch.randn(H, generator=g, dtype=dtype, requires_grad=True)
    W2 = (torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5).requires_grad_()
    b2 = torch.randn(V, generator=g, dtype=dtype, requires_grad=True)
    params = [table, W1, b1, W2, b2]
    out = []

    def grads_of(loss, inputs):
        out.append(loss.detach().clone())
        out.extend(torch.autograd.grad(loss, inputs))

    h = charmlp.ops.embed_linear_tanh(idx, table, W1, b1)
    out.append(h.detach().clone())
    grads_of((h * torch.linspace(-1, 1, H, dtype=dtype)).sum(), [table, W1, b1])
    logits = torch.randn(B, V, generator=g, dtype=dtype, requires_grad=True) * 3
    grads_of(charmlp.ops.cross_entropy(logits, y, label_smoothing=0.1), [logits])
    hidden = torch.randn(B, H, generator=g, dtype=dtype, requires_grad=True)
    grads_of(charmlp.ops.linear_cross_entropy(hidden, W2, b2, y), [hidden, W2, b2])
    y_all = y.clamp(min=0)
    grads_of(charmlp.ops.mlp_cross_entropy(idx, y_all, *params), params)
    logits2, loss = charmlp.ops.mlp_logits_cross_entropy(idx, y_all, *params)
    out.append(logits2.detach().clone())
    grads_of(loss, params)
    with torch.no_grad():
        copies = [p.detach().clone() for p in params]
        out.append(charmlp.ops.mlp_sgd_step(idx, y_all, *copies, 0.1))
        out.extend(copies)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_op_agrees_across_capabilities(dtype):
    results = {}
    prev = charmlp.cpu_capability()
    try:
        for cap in SUPPORTED:
            charmlp.set_cpu_capability(cap)
            results[cap] = _every_op(dtype)
    finally:
        charmlp.set_cpu_capability(prev)
    base = results["default"]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for cap, res in results.items():
        for i, (a, b) in enumerate(zip(res, base)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{cap} vs default, output {i}: {m}")


def test_every_op_is_bitwise_repeatable_under_each_capability(capability):
    assert_all_bitwise(_every_op(torch.float32), _every_op(torch.float32))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (5, 3, 10, 200, 27), (70, 8, 64, 100, 27), (9, 4, 30, 33, 300)],
                         ids=["tiny", "lecture", "long", "wide-vocab"])
def test_embed_linear_tanh_matches_pytorch_under_each_capability(capability, shape, embed_algorithm):
    B, T, E, H, V = shape
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (B, T), generator=g)
    table = torch.randn(V, E, generator=g, requires_grad=True)
    W = (torch.randn(H, T * E, generator=g) / (T * E) ** 0.5).requires_grad_()
    b = torch.randn(H, generator=g, requires_grad=True)
    gout = torch.randn(B, H, generator=g)
    got = charmlp.ops.embed_linear_tanh(idx, table, W, b)
    ggot = torch.autograd.grad(got, [table, W, b], gout)
    ref = reference.embed_linear_tanh(idx, table, W, b)
    gref = torch.autograd.grad(ref, [table, W, b], gout)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for a, e in zip(ggot, gref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("BV", [(1, 1), (33, 27), (64, 1000), (3, 16383)])
def test_losses_match_pytorch_under_each_capability(capability, BV):
    B, V = BV
    g = torch.Generator().manual_seed(4)
    H = 37
    x = torch.randn(B, H, generator=g, requires_grad=True)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B,), generator=g)
    for fn, ref in [
        (lambda: charmlp.ops.linear_cross_entropy(x, W, b, y, label_smoothing=0.05),
         lambda: reference.linear_cross_entropy(x, W, b, y, label_smoothing=0.05)),
        (lambda: charmlp.ops.cross_entropy(F.linear(x, W, b), y, reduction="sum"),
         lambda: reference.linear_cross_entropy(x, W, b, y, reduction="sum")),
    ]:
        got, exp = fn(), ref()
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
        for a, e in zip(torch.autograd.grad(got, [x, W, b]), torch.autograd.grad(exp, [x, W, b])):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# the op test files under each other capability
# --------------------------------------------------------------------------------------

OP_TEST_FILES = [
    "test_embed_linear_tanh.py",
    "test_cross_entropy.py",
    "test_linear_cross_entropy.py",
    "test_loss_options.py",
    "test_mlp_cross_entropy.py",
    "test_mlp_sgd_step.py",
    "test_mlp_sgd_steps.py",
    "test_model_forward.py",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in SUPPORTED if c != CHOSEN_AT_LOAD] or ["none"])
def test_the_op_tests_pass_under_a_forced_capability(name):
    if name == "none":
        pytest.skip("this CPU runs one capability only: the rest of the suite tests it")
    # (the naive kernels are compiled once, not per capability: forcing one changes nothing there)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "-k", "not naive",
           *[str(TESTS / f) for f in OP_TEST_FILES]]
    r = subprocess.run(cmd, cwd=TESTS.parent, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "CHARMLP_CPU_CAPABILITY": name})
    tail = "\n".join(r.stdout.splitlines()[-30:])
    assert r.returncode == 0, f"op tests under CHARMLP_CPU_CAPABILITY={name} failed:\n{tail}\n{r.stderr[-2000:]}"
    assert re.search(r"\d+ passed", tail), tail


# --------------------------------------------------------------------------------------
# no stray wide instruction in code an older CPU runs
# --------------------------------------------------------------------------------------

_LEVELS = {"default": 0, "avx2": 1, "avx512": 2}
_LEGACY_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67, 0xF0}


def _instruction_level(raw: list[int]) -> int:
    """0: legacy/SSE, 1: VEX-encoded (AVX, AVX2, FMA, F16C), 2: EVEX-encoded (AVX-512).
    In 64-bit mode 0xC4/0xC5 are always VEX and 0x62 always EVEX."""
    i = 0
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(raw):
        if raw[i] == 0x62:
            return 2
        if raw[i] in (0xC4, 0xC5):
            return 1
    return 0


def _allowed_level(symbol: str) -> int | None:
    """The level of the capability namespace a symbol belongs to or is instantiated with
    (``at::parallel_for`` over a ``charmlp::cpu_avx2`` lambda exists in that copy only);
    demangled or not (objdump leaves the longest names mangled: ``8cpu_avx2``)."""
    caps = re.findall(r"\bcpu_(default|avx2|avx512)::", symbol)  # demangled
    caps += re.findall(r"(?:11|8|10)cpu_(default|avx2|avx512)", symbol)  # mangled: length-prefixed
    return min(_LEVELS[c] for c in caps) if caps else None


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.skipif(not platform_is_x86_64(), reason="x86-64 encodings")
def test_no_code_an_older_cpu_runs_holds_wider_instructions():
    so = _C.__file__
    dis = subprocess.run(["objdump", "-d", "-C", "-w", so], capture_output=True, text=True, check=True).stdout
    funcs: dict[int, dict] = {}
    cur = None
    head = re.compile(r"^([0-9a-f]+) <(.*)>:$")
    insn = re.compile(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$")
    target = re.compile(r"\b(?:call|jmp)\s+([0-9a-f]+) <")
    for line in dis.splitlines():
        m = head.match(line)
        if m:
            cur = {"name": m.group(2), "level": 0, "calls": set(), "example": ""}
            funcs[int(m.group(1), 16)] = cur
            continue
        m = insn.match(line) if cur is not None else None
        if not m:
            continue
        level = _instruction_level([int(b, 16) for b in m.group(2).split()])
        if level > cur["level"]:
            cur["level"], cur["example"] = level, m.group(3).strip()
        t = target.search(m.group(3))
        if t:
            cur["calls"].add(int(t.group(1), 16))
    assert any(f["level"] == 2 for f in funcs.values() if "cpu_avx512" in f["name"]), "no AVX-512 kernels found"

    # What each function may use: its capability namespace's level; outside the namespaces
    # (inline code of torch's and the standard library's headers), the lowest level of the
    # functions that call it, directly or through others outside the namespaces, and the
    # baseline for anything nothing in the library calls (reached through a pointer).
    callers: dict[int, set[int]] = {a: set() for a in funcs}
    for a, f in funcs.items():
        for t in f["calls"]:
            if t in callers and t != a:
                callers[t].add(a)
    allowed = {a: _allowed_level(f["name"]) for a, f in funcs.items()}
    free = [a for a, lvl in allowed.items() if lvl is None]
    for a in free:
        allowed[a] = 2 if callers[a] else 0
    changed = True
    while changed:
        changed = False
        for a in free:
            lvl = min([allowed[c] for c in callers[a]] + [allowed[a]])
            if lvl < allowed[a]:
                allowed[a], changed = lvl, True
    bad = [f"{f['name'][:160]} (uses {f['example']!r}, may use level {allowed[a]})"
           for a, f in funcs.items() if f["level"] > allowed[a]]
    assert not bad, "wider instructions than every caller's CPU runs:\n" + "\n".join(bad[:20])
