// Device helpers shared by the charmlp CUDA kernels (csrc/cuda/*_kernels.cu).
//
// Deliberately light on includes (no ATen.h, no dispatcher): see kernels.h.
// * acc_t: kernels accumulate in at::opmath_type<scalar_t> (float for
//   float16/bfloat16/float32, double for float64).
// * Warp and block reductions with a fixed combination order, so every result
//   that does not go through an atomic is bitwise reproducible run to run.
// * Index loads that never go out of bounds: a bad index is recorded (first one
//   wins) and treated as contributing nothing; the host raises (runtime_cuda.cpp).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/kernels.h"

namespace charmlp {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__host__ __device__ inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// One thread per output, the naive kernels' launch (*_naive.cu): blocks of kNaiveThreads
// threads, enough of them for n outputs; a thread computes output global_thread_index().
constexpr int kNaiveThreads = 256;

inline unsigned naive_blocks(int64_t n) {
  return static_cast<unsigned>(ceil_div<int64_t>(n, kNaiveThreads));
}

__device__ inline int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Explicit instantiation of a launcher for the four floating types.
#define CHARMLP_INSTANTIATE_FLOAT_TYPES(MACRO) \
  MACRO(float, float)                          \
  MACRO(double, double)                        \
  MACRO(c10::Half, float)                      \
  MACRO(c10::BFloat16, float)

// ---------------------------------------------------------------------------------------
// Math in acc_t (float or double). Accurate expf/logf: the softmax is never the
// bottleneck here, and they keep float32 results within 1e-6 of the CPU kernels.
// ---------------------------------------------------------------------------------------
__device__ inline float dev_exp(float x) { return ::expf(x); }
__device__ inline double dev_exp(double x) { return ::exp(x); }
__device__ inline float dev_log(float x) { return ::logf(x); }
__device__ inline double dev_log(double x) { return ::log(x); }
__device__ inline float dev_tanh(float x) { return ::tanhf(x); }
__device__ inline double dev_tanh(double x) { return ::tanh(x); }

template <typename acc_t>
__device__ inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// ---------------------------------------------------------------------------------------
// Reductions. Butterfly shuffles: every lane ends with the same value, and the
// combination order depends only on the lane layout, never on timing.
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ inline T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = ::max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32); every thread gets the
// result. scratch: 32 values of shared memory. Fixed tree: deterministic. Must be
// called by all threads of the block.
template <typename T>
__device__ inline T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(v);
}

// ---------------------------------------------------------------------------------------
// Index errors.
// ---------------------------------------------------------------------------------------
__device__ inline void record_index_error(IndexErrorRecord err, IndexArg arg, int64_t value,
                                          int64_t bound, int64_t position) {
  if (atomicCAS(err.slot, 0ull, 1ull) == 0ull) {
    err.slot[1] = static_cast<unsigned long long>(value);
    err.slot[2] = static_cast<unsigned long long>(position);
    err.slot[3] = (static_cast<unsigned long long>(bound) << 8) | static_cast<unsigned long long>(arg);
  }
}

// True when a kernel recorded an error the host has not reported yet (mlp_sgd_step's
// update reads it so that a step with a bad index never touches the parameters).
__device__ inline bool index_error_is_set(IndexErrorRecord err) {
  return *static_cast<volatile unsigned long long*>(err.slot) != 0ull;
}

// idx[pos] checked against [0, bound): a bad value is recorded and returned as -1,
// which every caller treats as "contributes nothing".
__device__ inline int64_t load_index(const int64_t* p, int64_t pos, int64_t bound,
                                     IndexErrorRecord err, IndexArg arg) {
  const int64_t v = p[pos];
  if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound)) {
    record_index_error(err, arg, v, bound, pos);
    return -1;
  }
  return v;
}

// Class targets: ignore_index passes through as -1 without an error.
__device__ inline int64_t load_target(const int64_t* p, int64_t pos, int64_t bound,
                                      int64_t ignore_index, IndexErrorRecord err) {
  const int64_t v = p[pos];
  if (v == ignore_index) return -1;
  if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound)) {
    record_index_error(err, kArgTarget, v, bound, pos);
    return -1;
  }
  return v;
}

// Opts a kernel into `bytes` of dynamic shared memory when it may not fit the default
// (once per device, kernel and size: see runtime_cuda.cpp). The default 48 KiB limit
// covers static + dynamic shared memory (the default maximum dynamic size is 48 KiB
// minus the kernel's static __shared__), so the opt-in starts below 48 KiB by the
// static reserve that max_dynamic_smem() also keeps back.
constexpr size_t kStaticSmemReserveBytes = 2048;

template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes + kStaticSmemReserveBytes > 48 * 1024) {
    set_dynamic_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
  }
}

// Grid size for a grid-stride loop over `work` items.
inline int grid_for(int64_t work, int threads, int64_t max_blocks) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(work, threads), max_blocks)));
}

}  // namespace cuda
}  // namespace charmlp
