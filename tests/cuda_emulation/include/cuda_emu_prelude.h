// Force-included (-include) into every file of the emulated library, before the
// file's own includes: the charmlp op schemas and CUDA kernels register in the
// `charmlp_cuda_emu` namespace under the CPU dispatch key instead of `charmlp` / CUDA,
// so the emulated ops sit beside the real extension in one process.
#pragma once
#include <torch/library.h>

#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m) _TORCH_LIBRARY_FRAGMENT(charmlp_cuda_emu, m, C10_UID)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(charmlp_cuda_emu, CPU, m, C10_UID)
