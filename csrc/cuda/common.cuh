// Shared device helpers of the charmlp CUDA kernels.
//
// * acc_t: every kernel accumulates in at::opmath_type<scalar_t> (float for
//   float16/bfloat16/float32, double for float64).
// * Warp and block reductions with a fixed combination order, so every result
//   that does not go through an atomic is bitwise reproducible run to run.
// * The index-error flag: kernels never read or write out of bounds on a bad
//   index; they skip it and record it here, and the host turns the record into
//   a Python IndexError (index_check.cu explains when).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

namespace charmlp {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__host__ __device__ inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------
// Math in acc_t (float or double): exp/log/tanh overloads that pick the right precision.
// ---------------------------------------------------------------------------------------
__device__ inline float dev_exp(float x) { return __expf(x); }
__device__ inline double dev_exp(double x) { return ::exp(x); }
__device__ inline float dev_log(float x) { return __logf(x); }
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

// Sum over the whole block; every thread gets the result. scratch: >= 32 values of
// shared memory. Deterministic (fixed tree). Must be called by all threads.
template <typename T>
__device__ inline T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = ceil_div<int>(blockDim.x, kWarp);
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(v);
}

// ---------------------------------------------------------------------------------------
// Index errors.
//
// The record is 4 int64 on the device: [0] set flag (0/1), [1] offending value,
// [2] flat position, [3] (bound << 8) | argument code. The first kernel thread
// that finds a bad index claims the record with an atomicCAS; later ones leave
// it alone, so the report is about one real bad index.
// ---------------------------------------------------------------------------------------
enum IndexArg : int64_t { kArgIdx = 1, kArgTarget = 2 };

struct IndexErrorRecord {
  unsigned long long* slot;  // 4 entries, device memory

  __device__ inline void record(IndexArg arg, int64_t value, int64_t bound, int64_t position) const {
    if (atomicCAS(slot, 0ull, 1ull) == 0ull) {
      slot[1] = static_cast<unsigned long long>(value);
      slot[2] = static_cast<unsigned long long>(position);
      slot[3] = (static_cast<unsigned long long>(bound) << 8) | static_cast<unsigned long long>(arg);
    }
  }
  // True when any kernel of this device recorded an error that the host has not
  // reported yet; the in-place SGD update checks it so a bad step never touches
  // the parameters.
  __device__ inline bool is_set() const {
    return *static_cast<volatile unsigned long long*>(slot) != 0ull;
  }
};

// Reads an index and checks it against [0, bound): out-of-range values are recorded
// and returned as -1, which every caller treats as "contributes nothing".
template <typename index_t>
__device__ inline int64_t load_index(const index_t* p, int64_t pos, int64_t bound,
                                     IndexErrorRecord err, IndexArg arg) {
  const int64_t v = static_cast<int64_t>(p[pos]);
  if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound)) {
    err.record(arg, v, bound, pos);
    return -1;
  }
  return v;
}

// Same for class targets: ignore_index passes through as -1 without an error.
template <typename index_t>
__device__ inline int64_t load_target(const index_t* p, int64_t pos, int64_t bound,
                                      int64_t ignore_index, IndexErrorRecord err) {
  const int64_t v = static_cast<int64_t>(p[pos]);
  if (v == ignore_index) return -1;
  if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound)) {
    err.record(kArgTarget, v, bound, pos);
    return -1;
  }
  return v;
}

// Host side (index_check.cu).
// The error record of the current device (allocated once per device, never freed).
IndexErrorRecord index_error_record();
// Reports a recorded error as c10::IndexError (message from checks.h). In the
// default "sync" mode this synchronizes the current stream, unless the stream is
// being captured into a CUDA graph; see index_check.cu for the trade-off.
void check_index_errors();

// ---------------------------------------------------------------------------------------
// Launch helpers.
// ---------------------------------------------------------------------------------------
int num_sms();
// Largest dynamic shared memory a block may opt into on the current device.
size_t max_dynamic_smem();

// Opts a kernel into `bytes` of dynamic shared memory (needed above 48 KiB).
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Dispatch over the index dtypes the ops accept (int64, int32).
#define CHARMLP_DISPATCH_INDEX(TYPE, NAME, ...)                                   \
  [&] {                                                                           \
    if ((TYPE) == at::kLong) {                                                    \
      using index_t = int64_t;                                                    \
      return __VA_ARGS__();                                                       \
    } else {                                                                      \
      TORCH_CHECK((TYPE) == at::kInt, NAME, ": unsupported index dtype ", (TYPE)); \
      using index_t = int32_t;                                                    \
      return __VA_ARGS__();                                                       \
    }                                                                             \
  }()

#define CHARMLP_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda
}  // namespace charmlp
