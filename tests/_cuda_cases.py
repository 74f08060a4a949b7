"""What the two CUDA suites check, in one place: the cases per op, their inputs, the tolerances.

tests/test_cuda_ops.py runs charmlp's CUDA kernels on a GPU against charmlp.reference in
float64; tests/test_cuda_emulated.py runs the same kernel sources on the CPU through the
CUDA emulation against charmlp's CPU ops. Both take their shapes and inputs from here, so
a case added for one op reaches both suites. A ``*_GPU_ONLY`` list holds sizes that
would cost the emulation (every GPU thread run on the CPU) much time for a path a shared
case already takes.

Inputs are drawn in float64 and rounded to the dtype under test, so every dtype gets the
same numbers to its precision, and a float64 reference can start from exactly the
values the kernel saw.
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
# The ops' integer codes for F.cross_entropy's reductions.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# ----------------------------------------------------------------------------------------
# Cases per op
# ----------------------------------------------------------------------------------------

# embed_linear_tanh, (B, T, V, E, H): the lecture's size, degenerate and odd sizes, more
# rows than a 64-row tile, large V * E (the deterministic path's sort-based branch),
# enough rows for the split reductions.
ELT_SHAPES = [
    (32, 3, 27, 10, 200),
    (1, 1, 2, 1, 1),
    (7, 5, 13, 3, 65),
    (65, 2, 5, 1, 17),
    (130, 4, 1000, 7, 33),
    (700, 3, 27, 10, 70),
]
ELT_SHAPES_GPU_ONLY = [(300, 4, 1000, 7, 33), (4099, 3, 27, 10, 200)]

# cross_entropy, (B, V): tiny batches, rows narrower and wider than a warp (V around 32),
# wider rows, many blocks and enough rows for the count buffer.
CE_SHAPES = [(1, 2), (3, 5), (7, 3), (32, 27), (33, 32), (5, 33), (37, 100), (300, 5), (4200, 27)]
CE_SHAPES_GPU_ONLY = [(64, 1000), (4099, 27)]

# linear_cross_entropy, (B, H, V): the fused small-vocabulary kernels (V <= 32) with one
# and several blocks, V not a multiple of anything, and the generic path (V > 32, or a
# V <= 32 whose weight does not fit in shared memory: H = 3000).
LCE_SHAPES = [(1, 1, 2), (7, 13, 5), (32, 200, 27), (45, 17, 32), (700, 70, 27), (33, 9, 40), (100, 50, 100),
              (20, 3000, 20)]
LCE_SHAPES_GPU_ONLY = [(4099, 64, 27), (3, 3000, 27)]

# The whole model (mlp_cross_entropy(_and_grads), mlp_logits_cross_entropy, mlp_sgd_step),
# (B, T, V, E, H): the lecture's (the fused single-kernel step), B = 1, the smallest model,
# odd sizes, the fused path at B = 100 in float32 (at H = 200 shared memory admits
# B <= 114 in float32, 57 in float64), its batch limit at H = 64 (128 rows, 117 KB of
# shared memory in float32: 4 rows per warp, and the opt-in above 48 KB) and one row past
# it, 128 rows at H = 200, the general path (B = 300; V > 32).
MLP_SHAPES = [(32, 3, 27, 10, 200), (1, 3, 27, 10, 200), (1, 1, 2, 1, 1), (5, 2, 7, 3, 9), (17, 5, 7, 3, 33),
              (100, 3, 27, 10, 200), (128, 3, 27, 10, 64), (129, 3, 27, 10, 64), (128, 3, 27, 10, 200),
              (300, 3, 27, 10, 64), (40, 3, 40, 4, 50)]
MLP_SHAPES_GPU_ONLY = [(1000, 3, 27, 10, 200)]

# ----------------------------------------------------------------------------------------
# Inputs (on the CPU; the GPU suite moves them)
# ----------------------------------------------------------------------------------------


def elt_inputs(B, T, V, E, H, dtype=torch.float64, seed=0, idx_dtype=torch.int64):
    """idx [B, T], table [V, E], weight [H, T*E], bias [H] and an incoming gradient [B, H]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g).to(idx_dtype)
    table = torch.randn(V, E, generator=g, dtype=torch.float64)
    weight = torch.randn(H, T * E, generator=g, dtype=torch.float64) / (T * E) ** 0.5
    bias = torch.randn(H, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, H, generator=g, dtype=torch.float64)
    return idx, table.to(dtype), weight.to(dtype), bias.to(dtype), grad_out.to(dtype)


def ce_inputs(B, V, dtype=torch.float64, ignore_frac=0.2, ignore_index=-100, seed=0, scale=3.0):
    """logits [B, V] and target [B], about ``ignore_frac`` of it ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B,), generator=g)
    if ignore_frac:
        target[torch.rand(B, generator=g) < ignore_frac] = ignore_index
    return logits.to(dtype), target


def lce_inputs(B, H, V, dtype=torch.float64, seed=0, bias=True):
    """input [B, H], weight [V, H], bias [V] (None if not ``bias``) and target [B], about a
    fifth of it ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, (B,), generator=g)
    target[torch.rand(B, generator=g) < 0.2] = -100
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), target


def mlp_params(V, T, E, H, dtype=torch.float32, seed=0, device=None):
    """table, weight1, bias1, weight2, bias2 (charmlp.reference.PARAM_NAMES)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(V, E), (H, T * E), (H,), (V, H), (V,)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype) for s in shapes]


def mlp_batch(B, T, V, seed=0):
    """idx [B, T] and target [B], every 7th target ignored (-100) unless B = 1 (whose loss
    would be the NaN of a mean over no rows)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    if B > 1:
        target[::7] = -100
    return idx, target


def mlp_case(B, T, V, E, H, dtype=torch.float32, seed=0):
    """``(idx, target, params)``: :func:`mlp_batch` and :func:`mlp_params`."""
    return (*mlp_batch(B, T, V, seed), mlp_params(V, T, E, H, dtype, seed))


# ----------------------------------------------------------------------------------------
# Tolerances: (rtol, atol) by dtype, atol relative to the largest |expected| (at least 1)
# ----------------------------------------------------------------------------------------

# A CUDA kernel against charmlp's CPU op on the same inputs in the same dtype (the emulated
# suite): two float32-accumulating implementations that sum in different orders; bf16/f16
# results may differ by one rounding of their 8/11-bit mantissa.
TOL_VS_CPU_OP = {
    torch.float32: (2e-5, 2e-6),
    torch.float64: (1e-12, 1e-13),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}

# A CUDA kernel against charmlp.reference in float64 from the same rounded inputs (the GPU
# suite): sums over many rows differ in summation order; bf16 outputs are rounded to 8 bits.
TOL_VS_REFERENCE = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-11),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# bf16/f16 gradients (a ``what`` that starts with "grad"): the kernels see the rounded saved
# activations (tanh' = 1 - out^2 from a rounded out), the float64 reference does not.
TOL_VS_REFERENCE_GRAD = {
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def _assert_close_scaled(actual, expected, rtol, atol, what):
    a, e = actual.double(), expected.double()
    # Errors of long sums scale with their largest terms, not with each small entry.
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_close_to_cpu_op(actual, expected, dtype, what=""):
    """``actual`` (a CUDA kernel's output) == ``expected`` (the CPU op's) within
    :data:`TOL_VS_CPU_OP`; both in the same dtype and shape."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    _assert_close_scaled(actual, expected, *TOL_VS_CPU_OP[dtype], what)


def assert_close_to_reference(actual, expected, dtype, what=""):
    """``actual`` (a CUDA kernel's output in ``dtype``) == ``expected`` (usually the float64
    reference) within :data:`TOL_VS_REFERENCE` / :data:`TOL_VS_REFERENCE_GRAD`."""
    grad = what.startswith("grad") and dtype in TOL_VS_REFERENCE_GRAD
    _assert_close_scaled(actual, expected, *(TOL_VS_REFERENCE_GRAD if grad else TOL_VS_REFERENCE)[dtype], what)
