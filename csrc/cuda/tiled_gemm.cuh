// A small shared-memory tiled GEMM whose operands and epilogue are functors.
//
//   C[m, n] = sum_{r in split} A(m, r) * B(n, r)        then  epi(m, n, C[m, n], split)
//
// Why not cuBLAS: the operands of this model's GEMMs are never materialized.
// A(m, r) can be a gathered embedding (table[idx[b, r / E], r % E]), or
// dpre = grad_out * (1 - out^2) computed on load; the epilogue can add the bias
// and apply tanh, or scatter into the embedding-table gradient. One kernel then
// replaces gather + GEMM + bias + tanh (or elementwise + GEMM + scatter), which is
// what matters at this model's sizes (K = T*E = 30, H = 200, V = 27): the GEMMs
// are tiny and the cost is launches and memory traffic, not flops.
//
// Tiling: a 256-thread block computes a 64 x 64 tile of C, 4 x 4 values per
// thread (rows ty + 16 i, columns tx + 16 j: consecutive threads touch
// consecutive columns, so shared-memory reads are conflict-free and epilogue
// writes coalesce along n). The reduction runs in chunks of 16 through shared
// memory (+1 padding column against bank conflicts on the transposing stores).
// kAContigR / kBContigR say along which index the functor's memory is contiguous,
// so the tile loads map consecutive threads to consecutive addresses.
//
// Split reduction: blockIdx.z selects a range of r of length r_per_split; the
// epilogue receives the split index and writes partial sums that a second
// kernel adds in a fixed order (deterministic, unlike atomics).
#pragma once

#include <algorithm>

#include "cuda/device_common.cuh"

namespace charmlp {
namespace cuda {

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16, kGemmThreads = 256;

template <typename acc_t, bool kAContigR, bool kBContigR, class LoadA, class LoadB, class Epi>
__global__ void __launch_bounds__(kGemmThreads, 2)
    tiled_gemm_kernel(int64_t M, int64_t N, int64_t R, int64_t r_per_split, LoadA load_a,
                      LoadB load_b, Epi epi) {
  constexpr int BM = kGemmBM, BN = kGemmBN, BK = kGemmBK;
  constexpr int TM = 4, TN = 4;
  __shared__ acc_t As[BK][BM + 1];  // As[r][m]
  __shared__ acc_t Bs[BK][BN + 1];  // Bs[r][n]

  // M tiles along x (up to 2^31 - 1 blocks: M is the batch in most uses), N tiles along y.
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int split = blockIdx.z;
  const int64_t r_begin = static_cast<int64_t>(split) * r_per_split;
  const int64_t r_end = ::min(R, r_begin + r_per_split);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += BK) {
#pragma unroll
    for (int l = tid; l < BM * BK; l += kGemmThreads) {
      const int mm = kAContigR ? l / BK : l % BM;
      const int rr = kAContigR ? l % BK : l / BM;
      const int64_t m = m0 + mm, r = r0 + rr;
      As[rr][mm] = (m < M && r < r_end) ? load_a(m, r) : acc_t(0);
    }
#pragma unroll
    for (int l = tid; l < BN * BK; l += kGemmThreads) {
      const int nn = kBContigR ? l / BK : l % BN;
      const int rr = kBContigR ? l % BK : l / BN;
      const int64_t n = n0 + nn, r = r0 + rr;
      Bs[rr][nn] = (n < N && r < r_end) ? load_b(n, r) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc_t a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < N) epi(m, n, acc[i][j], split);
    }
  }
}

// Grid for an M x N output with `splits` reduction splits.
inline dim3 gemm_grid(int64_t M, int64_t N, int64_t splits) {
  const int64_t gx = ceil_div<int64_t>(M, kGemmBM), gy = ceil_div<int64_t>(N, kGemmBN);
  TORCH_CHECK(gx <= 2147483647LL && gy <= 65535 && splits <= 65535,
              "charmlp: GEMM too large for one launch (M = ", M, ", N = ", N, ", splits = ", splits, ")");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
}

// How many reduction splits keep every SM busy when the output has few tiles
// (e.g. grad_weight [H, T*E] summed over B rows), at least `min_r` of r per split.
inline int64_t gemm_splits(int64_t M, int64_t N, int64_t R, int64_t min_r = 256) {
  const int64_t tiles = ceil_div<int64_t>(M, kGemmBM) * ceil_div<int64_t>(N, kGemmBN);
  const int64_t want = ceil_div<int64_t>(2 * num_sms(), tiles);
  const int64_t most = ceil_div<int64_t>(R, min_r);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, 65535}));
}

// r per split, a multiple of the tile depth so every split but the last is full.
inline int64_t gemm_r_per_split(int64_t R, int64_t splits) {
  return std::max<int64_t>(kGemmBK, ceil_div<int64_t>(ceil_div<int64_t>(R, splits), kGemmBK) * kGemmBK);
}

// out[i] = (scalar_t) sum_s partial[s * n + i], summed in split order.
template <typename acc_t, typename out_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t n,
                                  out_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < splits; ++k) s += partial[k * n + i];
    out[i] = static_cast<out_t>(s);
  }
}

}  // namespace cuda
}  // namespace charmlp
