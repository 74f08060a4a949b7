// The per-device index-error record: a __device__ variable, so it exists in every
// CUDA context as soon as the module is loaded, needs no allocation (safe to first
// touch inside CUDA-graph capture), and is zero-initialized. runtime_cuda.cpp owns
// the host logic around it. Also the stand-alone range check of an index array.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "cuda/device_common.cuh"

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

namespace {

// Reads every value once through the checked loads and uses none.
__global__ void check_index_range_kernel(const int64_t* __restrict__ p, int64_t n, int64_t bound,
                                         IndexArg arg, int64_t ignore_index,
                                         IndexErrorRecord err) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (arg == kArgTarget) {
      (void)load_target(p, i, bound, ignore_index, err);
    } else {
      (void)load_index(p, i, bound, err, arg);
    }
  }
}

}  // namespace

void launch_check_index_range(const int64_t* p, int64_t n, int64_t bound, IndexArg arg,
                              int64_t ignore_index, IndexErrorRecord err, cudaStream_t stream) {
  if (n == 0) return;
  check_index_range_kernel<<<grid_for(n, 256, 4LL * num_sms()), 256, 0, stream>>>(
      p, n, bound, arg, ignore_index, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace charmlp
