// CUDA emulation (tests/cuda_emulation): tensors are CPU tensors, so the guard only
// checks that it was given a device.
#pragma once
#include <c10/core/Device.h>

#include "c10/cuda/CUDAFunctions.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};
}  // namespace cuda
}  // namespace c10
