// CUDA emulation (tests/cuda_emulation): the current stream (a null stream: every
// emulated call is synchronous) and the emulated device's properties.
#pragma once
#include "c10/cuda/CUDAException.h"
#include "c10/cuda/CUDAFunctions.h"
#include "cuda_emu_runtime.h"

namespace at {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
inline const cudaDeviceProp* getCurrentDeviceProperties() { return &::cuda_emu::device_properties(); }
}  // namespace cuda
}  // namespace at
