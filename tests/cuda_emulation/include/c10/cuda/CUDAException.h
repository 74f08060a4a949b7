// CUDA emulation (tests/cuda_emulation): C10_CUDA_CHECK over the emulated runtime.
#pragma once
#include <c10/util/Exception.h>

#include "cuda_emu_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t charmlp_emu_err = (EXPR);                                           \
    TORCH_CHECK(charmlp_emu_err == cudaSuccess, "CUDA emulation: ", #EXPR, " failed (", \
                static_cast<int>(charmlp_emu_err), ")");                                  \
  } while (0)
// Launch errors are raised by the emulated launch itself.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
