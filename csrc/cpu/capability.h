// The CPU kernels are compiled once per instruction set ("capability"), the way ATen
// compiles its native/cpu kernels (CMakeLists.txt: CHARMLP_CPU_CAPABILITIES):
//
//   default   the compiler's baseline for the target (x86-64: SSE2), runs anywhere
//   avx2      -mavx2 -mfma -mf16c                      (Haswell, Zen 1 and later)
//   avx512    + -mavx512f/bw/vl/dq, 512-bit vectors     (Skylake-SP, Ice Lake, Zen 4)
//
// cpu_dispatch.cpp picks the best one this CPU runs when the library loads
// (CHARMLP_CPU_CAPABILITY forces one). Every kernel header and source puts its code in
// namespace charmlp::CHARMLP_CPU_CAPABILITY, which each copy's compile defines as
// cpu_default, cpu_avx2 or cpu_avx512, so the copies' inline functions and template
// instantiations get distinct symbols: otherwise the linker would keep one copy of
// each, perhaps the AVX-512 one, and call it from the baseline code too (an illegal
// instruction on an older CPU). What the copies still share, inline code of torch's
// and the standard library's headers, is linked baseline first (CMakeLists.txt), and
// tests/test_cpu_capability.py checks the library's machine code for strays.
#pragma once

#ifndef CHARMLP_CPU_CAPABILITY
#define CHARMLP_CPU_CAPABILITY cpu_default
#endif
