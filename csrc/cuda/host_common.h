// Host-side helpers of the CUDA op wrappers (csrc/cuda/*_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/kernels.h"

namespace charmlp {
namespace cuda {

// Index tensors reach the kernels as contiguous int64 (a no-op for the usual int64
// input). int32 idx/target are converted by one small copy kernel: that costs less
// than compiling every kernel twice (build time is the scarce resource on CI).
inline at::Tensor index_tensor(const at::Tensor& t) {
  return t.scalar_type() == at::kLong ? t.contiguous() : t.to(at::kLong).contiguous();
}

inline long long* as_ll(int64_t* p) { return reinterpret_cast<long long*>(p); }
static_assert(sizeof(long long) == sizeof(int64_t));

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

#define CHARMLP_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda
}  // namespace charmlp
