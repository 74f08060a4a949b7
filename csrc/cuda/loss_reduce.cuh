// Reductions shared by the cross-entropy family (cross_entropy, linear_cross_entropy,
// mlp_sgd_step): per-block partial sums of row losses and counts of rows that are
// not ignore_index, summed by one block in a fixed order (deterministic), and the
// gradient scale d(loss)/d(row loss).
//
//   none: loss[b]                      scale_b = grad_loss[b]
//   sum:  sum_b loss[b]                scale_b = grad_loss
//   mean: sum_b loss[b] / count        scale_b = grad_loss / count   (0 / 0 = nan like torch)
#pragma once

#include "cuda/device_common.cuh"

namespace charmlp {
namespace cuda {

// Up to this many rows every block of a backward kernel recounts the targets itself
// (a few KB of reads per block) instead of launching count_targets_kernel first.
constexpr int64_t kCountInBlockMaxRows = 4096;

// Lane 0's bookkeeping for one row of a loss kernel: stores lse, the row loss for
// reduction none, and adds the row to this thread's partial sum and count. t < 0
// marks an ignored row (loss 0); counted says whether the row enters the mean.
//   row loss = lse - (1 - eps) x_t - (eps / V) sum_v x_v
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void record_row_loss(int64_t b, int64_t t, bool counted, acc_t lse,
                                                acc_t x_t, acc_t sum_x, acc_t eps, int64_t V,
                                                int64_t reduction, acc_t* lse_out,
                                                scalar_t* loss_rows, acc_t& my_sum,
                                                long long& my_count) {
  const acc_t loss =
      t < 0 ? acc_t(0) : lse - (acc_t(1) - eps) * x_t - eps / static_cast<acc_t>(V) * sum_x;
  lse_out[b] = lse;
  if (reduction == kReductionNone) loss_rows[b] = static_cast<scalar_t>(loss);
  my_sum += loss;
  my_count += counted;
}

// Block-wide sum of the loss partials and counts; thread 0 then writes either this
// block's partial (psum/pcount[blockIdx.x]) or, for a single-block grid, the final
// loss. Must be called by every thread of the block.
template <typename acc_t, typename out_t>
__device__ inline void block_finish_loss(acc_t my_sum, long long my_count, int64_t reduction,
                                         acc_t* psum, long long* pcount, out_t* loss) {
  __shared__ acc_t s_scratch[kWarp];
  __shared__ long long c_scratch[kWarp];
  const acc_t s = block_sum(my_sum, s_scratch);
  const long long c = block_sum(my_count, c_scratch);
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    *loss = static_cast<out_t>(reduction == kReductionMean ? s / static_cast<acc_t>(c) : s);
  } else {
    psum[blockIdx.x] = s;
    pcount[blockIdx.x] = c;
  }
}

// One block: loss = sum of the partials (/ total count for mean).
template <typename acc_t, typename out_t>
__global__ void finish_loss_kernel(const acc_t* __restrict__ psum,
                                   const long long* __restrict__ pcount, int64_t parts,
                                   int64_t reduction, out_t* __restrict__ loss) {
  __shared__ acc_t s_scratch[kWarp];
  __shared__ long long c_scratch[kWarp];
  acc_t s = acc_t(0);
  long long c = 0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) {
    s += psum[i];
    c += pcount[i];
  }
  s = block_sum(s, s_scratch);
  c = block_sum(c, c_scratch);
  if (threadIdx.x == 0) {
    *loss = static_cast<out_t>(reduction == kReductionMean ? s / static_cast<acc_t>(c) : s);
  }
}

// Number of targets != ignore_index, summed by the calling block (all threads get it).
template <typename index_t>
__device__ inline long long block_count_targets(const index_t* target, int64_t B,
                                                int64_t ignore_index) {
  __shared__ long long c_scratch[kWarp];
  long long c = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    c += static_cast<int64_t>(target[b]) != ignore_index;
  }
  return block_sum(c, c_scratch);
}

// One block: *count = number of targets != ignore_index.
template <typename index_t>
__global__ void count_targets_kernel(const index_t* __restrict__ target, int64_t B,
                                     int64_t ignore_index, long long* __restrict__ count) {
  const long long c = block_count_targets(target, B, ignore_index);
  if (threadIdx.x == 0) *count = c;
}

// The scale shared by every row for sum/mean (for none, use grad_loss[b] per row).
// grad_loss: acc_t pointer to one value (or [B] for none), null meaning 1.
// count: device count for mean, or null to count here (every block recounts all B
// targets: used for B <= kCountInBlockMaxRows).
template <typename acc_t, typename index_t>
__device__ inline acc_t shared_grad_scale(const acc_t* grad_loss, int64_t reduction,
                                          const long long* count, const index_t* target,
                                          int64_t B, int64_t ignore_index) {
  if (reduction == kReductionNone) return acc_t(1);
  acc_t g = grad_loss != nullptr ? grad_loss[0] : acc_t(1);
  if (reduction == kReductionMean) {
    const long long c = count != nullptr ? *count : block_count_targets(target, B, ignore_index);
    g = c > 0 ? g / static_cast<acc_t>(c) : acc_t(0);  // c == 0: every row is ignored
  }
  return g;
}

// Host: the final loss from the row kernel's per-block partials, when it used
// more than one block (a single block writes the loss itself).
template <typename acc_t, typename out_t>
inline void launch_finish_loss(const acc_t* psum, const long long* pcount, int64_t blocks,
                               int64_t reduction, out_t* loss, cudaStream_t stream) {
  if (blocks <= 1) return;
  finish_loss_kernel<acc_t, out_t><<<1, 1024, 0, stream>>>(psum, pcount, blocks, reduction, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace charmlp
