// Deliberately right and wrong kernels that show the emulator's checks work (run by
// tests/test_cuda_emulated.py::test_emulator_*): a result that depends on a missing
// barrier, divergent barriers, shuffles with missing lanes, shared memory past the
// default limit, a launch past __launch_bounds__, and the exact semantics of the built-ins the charmlp kernels use.
// Compiled only into the emulated library (build.py), never into charmlp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/device_common.cuh"

namespace {

using charmlp::cuda::kWarp;

// out[t] = s[(t + 1) % n] after every thread stored s[t] = t + 1; with_barrier = false
// leaves out the __syncthreads between the two, a race across warps.
__global__ void rotate_kernel(float* out, bool with_barrier) {
  extern __shared__ float s[];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

// Half of warp 0 waits at __syncthreads, the other half at a __syncwarp: a deadlock.
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.0f;
}

// Lanes 16..31 return before a full-warp shuffle: undefined on a GPU.
__global__ void shuffle_after_return_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Lanes 0..15 __syncwarp while lanes 16..31 shuffle: barriers that do not match.
__global__ void mismatched_warp_barriers_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_xor_kernel(float* out, int lane_mask) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 10.0f * threadIdx.x, lane_mask);
}

__global__ void syncthreads_or_kernel(float* out, int who) {
  out[threadIdx.x] = static_cast<float>(__syncthreads_or(static_cast<int>(threadIdx.x) == who));
}

// out[block * threads + thread] encodes blockIdx, gridDim and threadIdx.
__global__ void indexing_kernel(float* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[block * blockDim.x + threadIdx.x] =
      blockIdx.x + 10.0f * blockIdx.y + 100.0f * blockIdx.z + 1000.0f * threadIdx.x;
}

__global__ void big_smem_kernel(float* out) {
  extern __shared__ float s[];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::full({1024}, -7.0f);
  float* o = out.mutable_data_ptr<float>();
  if (name == "rotate_without_barrier" || name == "rotate_with_barrier") {
    rotate_kernel<<<1, 64, 64 * sizeof(float), nullptr>>>(o, name == "rotate_with_barrier");
    return out.narrow(0, 0, 64);
  }
  if (name == "divergent") {
    divergent_kernel<<<1, 64>>>(o);
  } else if (name == "shuffle_after_return") {
    shuffle_after_return_kernel<<<1, 32>>>(o);
  } else if (name == "mismatched_warp_barriers") {
    mismatched_warp_barriers_kernel<<<1, 32>>>(o);
  } else if (name == "shuffle_xor") {
    shuffle_xor_kernel<<<1, 64>>>(o, 5);
    return out.narrow(0, 0, 64);
  } else if (name == "syncthreads_or_true" || name == "syncthreads_or_false") {
    syncthreads_or_kernel<<<1, 128>>>(o, name == "syncthreads_or_true" ? 77 : -1);
    return out.narrow(0, 0, 128);
  } else if (name == "indexing") {
    indexing_kernel<<<dim3(3, 2, 2), 4>>>(o);
    return out.narrow(0, 0, 48);
  } else if (name == "over_launch_bounds") {
    bounded_kernel<<<1, 128>>>(o);
  } else if (name == "within_launch_bounds") {
    bounded_kernel<<<1, 64>>>(o);
    return out.narrow(0, 0, 64);
  } else if (name == "smem_64k_without_opt_in") {
    big_smem_kernel<<<1, 32, 64 * 1024, nullptr>>>(o);
  } else if (name == "smem_64k_with_opt_in") {
    auto kernel = big_smem_kernel;
    charmlp::cuda::set_dynamic_smem(kernel, 64 * 1024);
    kernel<<<1, 32, 64 * 1024, nullptr>>>(o);
    return out.narrow(0, 0, 32);
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charmlp_cuda_emu, m) {
  m.def("_emu_selftest(str name) -> Tensor", &selftest);
}
