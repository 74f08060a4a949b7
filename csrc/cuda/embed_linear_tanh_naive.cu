// embed_linear_tanh, naive CUDA version (the kernel tour's version 1; kernel_impl.h).
// Host side: naive_cuda.cpp.
//
// idx is (B, T), table (V, E), weight (H, T*E), bias (H); out is (B, H). K = T*E.
// Forward:   out[b, h] = tanh(bias[h] + sum_j sum_e weight[h, j*E + e] * table[idx[b, j], e])
// Backward, from the saved output (tanh' = 1 - out^2):
//   dpre[b, h]              = grad_out[b, h] * (1 - out[b, h]^2)                     (B, H)
//   grad_bias[h]            = sum_b dpre[b, h]                                       (H)
//   grad_weight[h, j*E + e] = sum_b dpre[b, h] * table[idx[b, j], e]                 (H, K)
//   grad_table[v, e]        = sum over (b, j) with idx[b, j] == v of
//                             sum_h dpre[b, h] * weight[h, j*E + e]                  (V, E)
// One thread per output element, each looping over what it sums (in float; double for
// double): no shared memory, no atomics, so every result is deterministic. Every index is
// checked first (launch_check_index_range); the kernels' loads are the checked ones too.
// The fast version (embed_linear_tanh_kernels.cu) runs these sums as shared-memory tiled GEMMs
// (a value read from global memory serves 64 outputs, not one) or folds table into weight.
#include "cuda/device_common.cuh"

namespace charmlp {
namespace cuda {

namespace {

// dpre[b, h] at i = b * H + h.
template <typename scalar_t, typename acc_t>
__device__ inline acc_t dpre(const scalar_t* grad_out, const scalar_t* out, int64_t i) {
  const acc_t o = static_cast<acc_t>(out[i]);
  return static_cast<acc_t>(grad_out[i]) * (acc_t(1) - o * o);
}

// One thread per out[b, h].
template <typename scalar_t, typename acc_t>
__global__ void naive_embed_forward_kernel(const int64_t* idx, const scalar_t* table,
                                           const scalar_t* weight, const scalar_t* bias,
                                           scalar_t* out, int64_t B, int64_t T, int64_t V,
                                           int64_t E, int64_t H, IndexErrorRecord err) {
  const int64_t i = global_thread_index();
  if (i >= B * H) return;
  const int64_t b = i / H, h = i % H, K = T * E;
  acc_t pre = bias != nullptr ? static_cast<acc_t>(bias[h]) : acc_t(0);
  for (int64_t j = 0; j < T; ++j) {
    const int64_t v = load_index(idx, b * T + j, V, err, kArgIdx);  // -1: a bad index
    if (v < 0) continue;
    for (int64_t e = 0; e < E; ++e) {
      pre += static_cast<acc_t>(weight[h * K + j * E + e]) * static_cast<acc_t>(table[v * E + e]);
    }
  }
  out[i] = static_cast<scalar_t>(dev_tanh(pre));
}

// One thread per grad_bias[h].
template <typename scalar_t, typename acc_t>
__global__ void naive_embed_grad_bias_kernel(const scalar_t* grad_out, const scalar_t* out,
                                             scalar_t* grad_bias, int64_t B, int64_t H) {
  const int64_t h = global_thread_index();
  if (h >= H) return;
  acc_t s = 0;
  for (int64_t b = 0; b < B; ++b) s += dpre<scalar_t, acc_t>(grad_out, out, b * H + h);
  grad_bias[h] = static_cast<scalar_t>(s);
}

// One thread per grad_weight[h, k], k = j*E + e.
template <typename scalar_t, typename acc_t>
__global__ void naive_embed_grad_weight_kernel(const scalar_t* grad_out, const scalar_t* out,
                                               const int64_t* idx, const scalar_t* table,
                                               scalar_t* grad_weight, int64_t B, int64_t T,
                                               int64_t V, int64_t E, int64_t H,
                                               IndexErrorRecord err) {
  const int64_t K = T * E, i = global_thread_index();
  if (i >= H * K) return;
  const int64_t h = i / K, k = i % K, j = k / E, e = k % E;
  acc_t s = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t v = load_index(idx, b * T + j, V, err, kArgIdx);
    if (v < 0) continue;
    s += dpre<scalar_t, acc_t>(grad_out, out, b * H + h) * static_cast<acc_t>(table[v * E + e]);
  }
  grad_weight[i] = static_cast<scalar_t>(s);
}

// One thread per grad_table[v, e]: scans every (b, j) for the ones that read row v.
template <typename scalar_t, typename acc_t>
__global__ void naive_embed_grad_table_kernel(const scalar_t* grad_out, const scalar_t* out,
                                              const int64_t* idx, const scalar_t* weight,
                                              scalar_t* grad_table, int64_t B, int64_t T,
                                              int64_t V, int64_t E, int64_t H,
                                              IndexErrorRecord err) {
  const int64_t K = T * E, i = global_thread_index();
  if (i >= V * E) return;
  const int64_t v = i / E, e = i % E;
  acc_t s = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < T; ++j) {
      if (load_index(idx, b * T + j, V, err, kArgIdx) != v) continue;
      for (int64_t h = 0; h < H; ++h) {
        s += dpre<scalar_t, acc_t>(grad_out, out, b * H + h) *
             static_cast<acc_t>(weight[h * K + j * E + e]);
      }
    }
  }
  grad_table[i] = static_cast<scalar_t>(s);
}

}  // namespace

template <typename scalar_t>
void launch_naive_embed_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                                const scalar_t* bias, scalar_t* out, int64_t B, int64_t T,
                                int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                                cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  launch_check_index_range(idx, B * T, V, kArgIdx, /*ignore_index=*/-1, err, stream);
  if (B * H > 0) {
    naive_embed_forward_kernel<scalar_t, acc_t>
        <<<naive_blocks(B * H), kNaiveThreads, 0, stream>>>(
        idx, table, weight, bias, out, B, T, V, E, H, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_naive_embed_backward(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                                 const scalar_t* table, const scalar_t* weight,
                                 scalar_t* grad_table, scalar_t* grad_weight, scalar_t* grad_bias,
                                 int64_t B, int64_t T, int64_t V, int64_t E, int64_t H,
                                 IndexErrorRecord err, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  launch_check_index_range(idx, B * T, V, kArgIdx, /*ignore_index=*/-1, err, stream);
  if (H > 0) {
    naive_embed_grad_bias_kernel<scalar_t, acc_t>
        <<<naive_blocks(H), kNaiveThreads, 0, stream>>>(
        grad_out, out, grad_bias, B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (H * T * E > 0) {
    naive_embed_grad_weight_kernel<scalar_t, acc_t>
        <<<naive_blocks(H * T * E), kNaiveThreads, 0, stream>>>(
        grad_out, out, idx, table, grad_weight, B, T, V, E, H, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (V * E > 0) {
    naive_embed_grad_table_kernel<scalar_t, acc_t>
        <<<naive_blocks(V * E), kNaiveThreads, 0, stream>>>(
        grad_out, out, idx, weight, grad_table, B, T, V, E, H, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                    \
  template void launch_naive_embed_forward<scalar_t>(                                          \
      const int64_t*, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t,    \
      int64_t, int64_t, int64_t, int64_t, IndexErrorRecord, cudaStream_t);                      \
  template void launch_naive_embed_backward<scalar_t>(                                         \
      const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*, const scalar_t*,       \
      scalar_t*, scalar_t*, scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t,             \
      IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

}  // namespace cuda
}  // namespace charmlp
