// CUDA kernels of linear_cross_entropy (host side: linear_cross_entropy_cuda.cpp):
// cross_entropy(input @ W^T + bias, target),
// with the output projection fused into the loss.
//
// Small vocabulary (V <= 32, this model's V = 27), "fused" path:
//   A block stages W [V, H] in shared memory once (row stride H | 1, odd, so the
//   32 lanes reading W[lane, h] hit 32 different banks). Each warp takes 4 rows
//   at a time: stages them in shared memory, and lane v computes logit z_v for
//   the 4 rows (4 FMAs per W load). The whole row of logits is then one register
//   per lane: max, lse, loss and (backward) the gradient are warp shuffles. The
//   logits never exist in global memory; only lse [B] is saved for backward.
//   Backward recomputes z from input and W and, per tile of 32 rows:
//     dz[b, v]    = scale_b (exp(z - lse_b) - (1 - eps) [v == t_b] - eps / V)   (registers)
//     grad_input  = dz @ W        (lanes over h, W from shared memory)
//     grad_W     += dz^T @ input  (each thread owns fixed (v, h) entries: no atomics)
//     grad_bias  += sum_b dz
//   Blocks write partial grad_W / grad_bias that a second kernel sums in block
//   order (none when one block suffices, e.g. B = 32): deterministic.
//   Shared memory grows with H (about (2 V + 33) H values backward); above the
//   device's limit the generic path is used.
//
// Generic path (V > 32 or H too large): logits from cuBLAS (at::linear) in a
// temporary, the cross_entropy kernels, and cuBLAS again for the backward GEMMs.
// The temporary [B, V] logits live only inside each call, never across forward
// and backward.
#include "cuda/device_common.cuh"
#include "cuda/loss_reduce.cuh"
#include "cuda/tiled_gemm.cuh"

namespace charmlp {
namespace cuda {

namespace {

constexpr int kLceWarps = 8;
constexpr int kLceThreads = kLceWarps * kWarp;
constexpr int kRowsPerWarp = 4;
constexpr int kTileRows = kLceWarps * kRowsPerWarp;  // rows per block iteration (backward)

// Shared-memory footprint (in acc_t values) of the two fused kernels.
__host__ __device__ inline int64_t padded(int64_t H) { return H | 1; }
inline int64_t forward_smem_values(int64_t V, int64_t H) {
  return V * padded(H) + static_cast<int64_t>(kTileRows) * H;
}
inline int64_t backward_smem_values(int64_t V, int64_t H) {
  return V * padded(H) + static_cast<int64_t>(kTileRows) * H + kTileRows * kWarp + V * H + kWarp;
}

// Stages W [V, H] (any float type) into W_s [V, H | 1] as acc_t. All threads.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_weight(const scalar_t* __restrict__ W, int64_t V, int64_t H,
                                    acc_t* W_s) {
  const int64_t Hp = H | 1;
  for (int64_t i = threadIdx.x; i < V * H; i += blockDim.x) {
    const int64_t v = i / H, h = i - v * H;
    W_s[v * Hp + h] = static_cast<acc_t>(W[i]);
  }
}

// Stages rows b0 .. b0 + kRowsPerWarp - 1 of x [B, H] into xw [kRowsPerWarp, H]
// (zeros past B), then lane v < V returns z[r] = bias_v + x[b0 + r] . W[v]. One warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_logits(const scalar_t* __restrict__ x, int64_t B, int64_t H,
                                   int64_t V, int64_t b0, const acc_t* W_s, acc_t bias_v,
                                   acc_t* xw, acc_t (&z)[kRowsPerWarp]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t b = b0 + r;
    for (int64_t h = lane; h < H; h += kWarp) {
      xw[r * H + h] = b < B ? static_cast<acc_t>(x[b * H + h]) : acc_t(0);
    }
  }
  __syncwarp();
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) z[r] = bias_v;
  if (lane < V) {
    const acc_t* w = W_s + lane * (H | 1);
    for (int64_t h = 0; h < H; ++h) {
      const acc_t wv = w[h];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) z[r] += xw[r * H + h] * wv;
    }
  }
}

// Row statistics of one row of logits held one per lane (lanes >= V hold junk).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_lse(acc_t z, int64_t V) {
  const int lane = threadIdx.x % kWarp;
  const acc_t m = warp_max(lane < V ? z : neg_inf<acc_t>());
  // z == -inf contributes 0 (also when m == -inf); a NaN z is ignored by the max but
  // must still make lse NaN, as on CPU, so the test is on z, not on m.
  const acc_t e = lane < V && z != neg_inf<acc_t>() ? dev_exp(z - m) : acc_t(0);
  return m + dev_log(warp_sum(e));
}

// input B x H, W V x H, bias V (or null), target B -> lse B, loss [B] or reduced.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLceThreads, 1)  // 1 block/SM (shared memory): no register cap
    lce_forward_small_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ W,
                             const scalar_t* __restrict__ bias, const int64_t* __restrict__ target,
                             int64_t B, int64_t H, int64_t V, int64_t ignore_index, acc_t eps,
                             int64_t reduction, acc_t* __restrict__ lse_out,
                             scalar_t* __restrict__ loss_rows, acc_t* __restrict__ psum,
                             long long* __restrict__ pcount, scalar_t* __restrict__ loss_final,
                             IndexErrorRecord err) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* W_s = reinterpret_cast<acc_t*>(smem_raw);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  acc_t* xw = W_s + V * padded(H) + warp * kRowsPerWarp * H;
  stage_weight(W, V, H, W_s);
  const acc_t bias_v = bias != nullptr && lane < V ? static_cast<acc_t>(bias[lane]) : acc_t(0);
  __syncthreads();

  acc_t my_sum = acc_t(0);
  long long my_count = 0;
  const int64_t groups = ceil_div<int64_t>(B, kRowsPerWarp);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kLceWarps + warp; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kLceWarps) {
    const int64_t b0 = g * kRowsPerWarp;
    acc_t z[kRowsPerWarp];
    warp_logits(x, B, H, V, b0, W_s, bias_v, xw, z);
    __syncwarp();  // xw is overwritten by the next group
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t b = b0 + r;
      // No `break`: it would keep the loop rolled and z[] in local memory. b is
      // warp-uniform, so the shuffles below stay convergent.
      if (b >= B) continue;
      const acc_t lse = warp_lse(z[r], V);
      const int64_t t = load_target(target, b, V, ignore_index, err);
      const acc_t zt = warp_sum(lane == t ? z[r] : acc_t(0));
      const acc_t sz = eps != acc_t(0) ? warp_sum(lane < V ? z[r] : acc_t(0)) : acc_t(0);
      if (lane == 0) {
        record_row_loss<acc_t, scalar_t>(b, t, target[b] != ignore_index, lse, zt, sz, eps, V,
                                         reduction, lse_out, loss_rows, my_sum, my_count);
      }
    }
  }
  if (reduction != kReductionNone) {
    block_finish_loss<acc_t, scalar_t>(my_sum, my_count, reduction, psum, pcount, loss_final);
  }
}

// Gradients from input B x H, W V x H, bias V (or null), target B, lse B.
// grad_loss: acc [B] (none) or [1], null = 1. count: device count for mean or null
// (each block counts; B <= 4096 only). Outputs: grad_input B x H; grad_W V x H and
// grad_bias V directly when gridDim.x == 1, else partials pW [grid, V, H], pb [grid, V].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLceThreads, 1)  // 1 block/SM (shared memory): no register cap
    lce_backward_small_kernel(const acc_t* __restrict__ grad_loss, int64_t reduction,
                              const long long* __restrict__ count, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias,
                              const int64_t* __restrict__ target, const acc_t* __restrict__ lse,
                              int64_t B, int64_t H, int64_t V, int64_t ignore_index, acc_t eps,
                              scalar_t* __restrict__ grad_input, scalar_t* __restrict__ grad_W,
                              scalar_t* __restrict__ grad_bias, acc_t* __restrict__ pW,
                              acc_t* __restrict__ pb, IndexErrorRecord err) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t Hp = padded(H);
  acc_t* W_s = reinterpret_cast<acc_t*>(smem_raw);  // V x Hp
  acc_t* x_s = W_s + V * Hp;                         // kTileRows x H
  acc_t* dz_s = x_s + kTileRows * H;                 // kTileRows x 32
  acc_t* gW_s = dz_s + kTileRows * kWarp;            // V x H
  acc_t* gb_s = gW_s + V * H;                        // 32
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  stage_weight(W, V, H, W_s);
  for (int64_t i = threadIdx.x; i < V * H; i += blockDim.x) gW_s[i] = acc_t(0);
  if (threadIdx.x < kWarp) gb_s[threadIdx.x] = acc_t(0);
  const acc_t bias_v = bias != nullptr && lane < V ? static_cast<acc_t>(bias[lane]) : acc_t(0);
  const acc_t g = shared_grad_scale(grad_loss, reduction, count, target, B, ignore_index);
  const acc_t smooth = eps / static_cast<acc_t>(V), hit = acc_t(1) - eps;
  __syncthreads();

  const int64_t tiles = ceil_div<int64_t>(B, kTileRows);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    // Phase 1 (per warp): logits, dz, grad_input for this warp's 4 rows.
    const int row0 = warp * kRowsPerWarp;
    const int64_t b0 = tile * kTileRows + row0;
    acc_t z[kRowsPerWarp];
    warp_logits(x, B, H, V, b0, W_s, bias_v, x_s + row0 * H, z);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t b = b0 + r;
      acc_t d = acc_t(0);
      if (b < B) {
        const int64_t t = load_target(target, b, V, ignore_index, err);
        if (t >= 0 && lane < V) {
          const acc_t scale =
              reduction == kReductionNone ? (grad_loss != nullptr ? grad_loss[b] : acc_t(1)) : g;
          d = scale * (dev_exp(z[r] - lse[b]) - smooth - (lane == t ? hit : acc_t(0)));
        }
      }
      dz_s[(row0 + r) * kWarp + lane] = d;
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t b = b0 + r;
      if (b >= B) continue;
      const acc_t* dz = dz_s + (row0 + r) * kWarp;
      for (int64_t h = lane; h < H; h += kWarp) {
        acc_t s = acc_t(0);
        for (int64_t v = 0; v < V; ++v) s += dz[v] * W_s[v * Hp + h];
        grad_input[b * H + h] = static_cast<scalar_t>(s);
      }
    }
    __syncthreads();
    // Phase 2 (block): owned (v, h) entries of grad_W += dz^T x over the tile's rows.
    for (int64_t o = threadIdx.x; o < V * H; o += blockDim.x) {
      const int64_t v = o / H, h = o - v * H;
      acc_t s = acc_t(0);
#pragma unroll 8
      for (int r = 0; r < kTileRows; ++r) s += dz_s[r * kWarp + v] * x_s[r * H + h];
      gW_s[o] += s;
    }
    if (threadIdx.x < V) {
      acc_t s = acc_t(0);
      for (int r = 0; r < kTileRows; ++r) s += dz_s[r * kWarp + threadIdx.x];
      gb_s[threadIdx.x] += s;
    }
    __syncthreads();  // x_s / dz_s are refilled by the next tile
  }

  if (gridDim.x == 1) {
    for (int64_t i = threadIdx.x; i < V * H; i += blockDim.x) grad_W[i] = static_cast<scalar_t>(gW_s[i]);
    if (threadIdx.x < V) grad_bias[threadIdx.x] = static_cast<scalar_t>(gb_s[threadIdx.x]);
  } else {
    for (int64_t i = threadIdx.x; i < V * H; i += blockDim.x) pW[blockIdx.x * V * H + i] = gW_s[i];
    if (threadIdx.x < V) pb[blockIdx.x * V + threadIdx.x] = gb_s[threadIdx.x];
  }
}

}  // namespace

bool lce_fused_ok(int64_t V, int64_t H, size_t acc_size, bool backward) {
  if (V > kWarp) return false;
  const int64_t values = backward ? backward_smem_values(V, H) : forward_smem_values(V, H);
  return static_cast<size_t>(values) * acc_size <= max_dynamic_smem();
}

int lce_blocks(int64_t B) { return grid_for(B, kTileRows, num_sms()); }

template <typename scalar_t, typename acc_t>
void launch_lce_forward(const scalar_t* input, const scalar_t* weight, const scalar_t* bias,
                        const int64_t* target, int64_t B, int64_t H, int64_t V,
                        int64_t ignore_index, acc_t eps, int64_t reduction, acc_t* lse,
                        scalar_t* loss_rows, acc_t* psum, long long* pcount,
                        scalar_t* loss_final, int blocks, IndexErrorRecord err,
                        cudaStream_t stream) {
  auto kernel = lce_forward_small_kernel<scalar_t, acc_t>;
  const size_t smem = static_cast<size_t>(forward_smem_values(V, H)) * sizeof(acc_t);
  set_dynamic_smem(kernel, smem);
  kernel<<<blocks, kLceThreads, smem, stream>>>(input, weight, bias, target, B, H, V,
                                                 ignore_index, eps, reduction, lse, loss_rows,
                                                 psum, pcount, loss_final, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (reduction != kReductionNone) {
    launch_finish_loss<acc_t, scalar_t>(psum, pcount, blocks, reduction, loss_final, stream);
  }
}

template <typename scalar_t, typename acc_t>
void launch_lce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* input,
                         const scalar_t* weight, const scalar_t* bias, const int64_t* target,
                         const acc_t* lse, int64_t B, int64_t H, int64_t V, int64_t ignore_index,
                         acc_t eps, scalar_t* grad_input, scalar_t* grad_weight,
                         scalar_t* grad_bias, acc_t* partial_w, acc_t* partial_b,
                         long long* count_buf, int blocks, IndexErrorRecord err,
                         cudaStream_t stream) {
  const bool use_count = needs_count_buffer(reduction, B, blocks);
  TORCH_CHECK(!use_count || count_buf != nullptr,
              "charmlp: linear_cross_entropy_backward needs a count buffer");
  if (use_count) {
    count_targets_kernel<int64_t><<<1, 1024, 0, stream>>>(target, B, ignore_index, count_buf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto kernel = lce_backward_small_kernel<scalar_t, acc_t>;
  const size_t smem = static_cast<size_t>(backward_smem_values(V, H)) * sizeof(acc_t);
  set_dynamic_smem(kernel, smem);
  kernel<<<blocks, kLceThreads, smem, stream>>>(
      grad_loss, reduction, use_count ? count_buf : nullptr, input, weight, bias, target, lse, B, H,
      V, ignore_index, eps, grad_input, grad_weight, grad_bias, partial_w, partial_b, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (blocks > 1) {  // partials summed in block order: deterministic
    const int64_t n = V * H;
    sum_splits_kernel<acc_t, scalar_t><<<grid_for(n, 256, 4LL * num_sms()), 256, 0, stream>>>(
        partial_w, blocks, n, grad_weight);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_splits_kernel<acc_t, scalar_t><<<1, kWarp, 0, stream>>>(partial_b, blocks, V, grad_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                      \
  template void launch_lce_forward<scalar_t, acc_t>(                                             \
      const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*, int64_t, int64_t,        \
      int64_t, int64_t, acc_t, int64_t, acc_t*, scalar_t*, acc_t*, long long*, scalar_t*, int,    \
      IndexErrorRecord, cudaStream_t);                                                            \
  template void launch_lce_backward<scalar_t, acc_t>(                                            \
      const acc_t*, int64_t, const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*,   \
      const acc_t*, int64_t, int64_t, int64_t, int64_t, acc_t, scalar_t*, scalar_t*, scalar_t*,   \
      acc_t*, acc_t*, long long*, int, IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

}  // namespace cuda
}  // namespace charmlp
