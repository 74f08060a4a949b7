// The per-device index-error record: a __device__ variable, so it exists in every
// CUDA context as soon as the module is loaded, needs no allocation (safe to first
// touch inside CUDA-graph capture), and is zero-initialized. runtime_cuda.cpp owns
// the host logic around it.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace charmlp {
namespace cuda {

namespace {
__device__ unsigned long long g_index_error[4];
}  // namespace

unsigned long long* index_error_slot_address() {
  void* p = nullptr;
  C10_CUDA_CHECK(cudaGetSymbolAddress(&p, g_index_error));
  return static_cast<unsigned long long*>(p);
}

}  // namespace cuda
}  // namespace charmlp
