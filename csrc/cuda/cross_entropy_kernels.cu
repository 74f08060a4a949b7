// CUDA kernels of cross_entropy (F.cross_entropy for [B, V] logits, class targets).
// Host side: cross_entropy_cuda.cpp.
//
// Forward: one warp per row. Each lane keeps an online (max, sum exp) over the
// columns v = lane, lane + 32, ...; the warp combines them with shuffles:
//   lse = m + log sum_v exp(x_v - m),  m = max_v x_v
//   loss = lse - (1 - eps) x_t - (eps / V) sum_v x_v       (0 for ignore_index rows)
// At V <= 32 (this model: 27) a row is one coalesced load, one value per lane, and
// max / lse / loss live in registers. Per-block partial sums of the row losses and
// counts go through loss_reduce.cuh (one more tiny kernel only when the grid has
// more than one block), so the reduction is deterministic.
//
// Backward: one pass, one thread per element:
//   grad[b, v] = scale_b (exp(x - lse_b) - (1 - eps) [v == t_b] - eps / V),  0 if ignored
// For mean, scale needs the count of non-ignored rows: up to 4096 rows each block
// recounts the targets, beyond that count_targets_kernel runs first (no host sync).
#include "cuda/device_common.cuh"
#include "cuda/loss_reduce.cuh"

namespace charmlp {
namespace cuda {

namespace {

constexpr int kRowThreads = 256;  // 8 rows (warps) per block in flight
constexpr int kElemThreads = 256;

// logits B x V, target B -> lse B (acc), loss: [B] (none) or the reduced scalar.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                      int64_t B, int64_t V, int64_t ignore_index, acc_t eps, int64_t reduction,
                      acc_t* __restrict__ lse_out, scalar_t* __restrict__ loss_rows,
                      acc_t* __restrict__ psum, long long* __restrict__ pcount,
                      scalar_t* __restrict__ loss_final, IndexErrorRecord err) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  acc_t my_sum = acc_t(0);
  long long my_count = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * warps + warp; b < B;
       b += static_cast<int64_t>(gridDim.x) * warps) {
    const scalar_t* row = logits + b * V;
    const int64_t t = load_target(target, b, V, ignore_index, err);
    // Online (m, s): s = sum exp(x - m) over this lane's columns. A NaN logit never
    // raises m (x > m is false) but must still poison s, as on CPU and in torch:
    // hence "x != -inf" rather than "m != -inf" (which would drop a NaN seen while
    // m is still -inf), and the rescale below keys on s, not on m.
    acc_t m = neg_inf<acc_t>(), s = acc_t(0), sx = acc_t(0), xt = acc_t(0);
    for (int64_t v = lane; v < V; v += kWarp) {
      const acc_t x = static_cast<acc_t>(row[v]);
      if (x > m) {
        s = (m == neg_inf<acc_t>() ? s : s * dev_exp(m - x)) + acc_t(1);
        m = x;
      } else if (x != neg_inf<acc_t>()) {
        s += dev_exp(x - m);
      }
      sx += x;
      if (v == t) xt = x;
    }
    const acc_t M = warp_max(m);
    s = s != acc_t(0) ? s * dev_exp(m - M) : acc_t(0);  // s == 0: nothing but -inf here
    const acc_t lse = M + dev_log(warp_sum(s));
    xt = warp_sum(xt);
    sx = eps != acc_t(0) ? warp_sum(sx) : acc_t(0);
    if (lane == 0) {
      record_row_loss<acc_t, scalar_t>(b, t, target[b] != ignore_index, lse, xt, sx, eps, V,
                                       reduction, lse_out, loss_rows, my_sum, my_count);
    }
  }
  if (reduction != kReductionNone) {
    block_finish_loss<acc_t, scalar_t>(my_sum, my_count, reduction, psum, pcount, loss_final);
  }
}

// grad B x V from logits B x V, target B, lse B; grad_loss [B] (none) or [1] (acc dtype,
// null = 1); count: device count of non-ignored rows for mean (null: count here).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElemThreads)
    ce_backward_kernel(const acc_t* __restrict__ grad_loss, int64_t reduction,
                       const long long* __restrict__ count, const scalar_t* __restrict__ logits,
                       const int64_t* __restrict__ target, const acc_t* __restrict__ lse,
                       int64_t B, int64_t V, int64_t ignore_index, acc_t eps,
                       scalar_t* __restrict__ grad, IndexErrorRecord err) {
  const acc_t g = shared_grad_scale(grad_loss, reduction, count, target, B, ignore_index);
  const acc_t smooth = eps / static_cast<acc_t>(V), hit = acc_t(1) - eps;
  const int64_t n = B * V;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / V, v = i - b * V;
    const int64_t t = load_target(target, b, V, ignore_index, err);
    acc_t d = acc_t(0);
    if (t >= 0) {
      const acc_t scale =
          reduction == kReductionNone ? (grad_loss != nullptr ? grad_loss[b] : acc_t(1)) : g;
      const acc_t p = dev_exp(static_cast<acc_t>(logits[i]) - lse[b]);
      d = scale * (p - smooth - (v == t ? hit : acc_t(0)));
    }
    grad[i] = static_cast<scalar_t>(d);
  }
}

}  // namespace

int ce_forward_blocks(int64_t B) { return grid_for(B * kWarp, kRowThreads, 8LL * num_sms()); }
int ce_backward_blocks(int64_t B, int64_t V) { return grid_for(B * V, kElemThreads, 8LL * num_sms()); }

bool needs_count_buffer(int64_t reduction, int64_t B, int blocks) {
  return reduction == kReductionMean && blocks > 1 && B > kCountInBlockMaxRows;
}

template <typename scalar_t, typename acc_t>
void launch_ce_forward(const scalar_t* logits, const int64_t* target, int64_t B, int64_t V,
                       int64_t ignore_index, acc_t eps, int64_t reduction, acc_t* lse,
                       scalar_t* loss_rows, acc_t* psum, long long* pcount, scalar_t* loss_final,
                       int blocks, IndexErrorRecord err, cudaStream_t stream) {
  ce_forward_kernel<scalar_t, acc_t><<<blocks, kRowThreads, 0, stream>>>(
      logits, target, B, V, ignore_index, eps, reduction, lse, loss_rows, psum, pcount, loss_final,
      err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (reduction != kReductionNone) {
    launch_finish_loss<acc_t, scalar_t>(psum, pcount, blocks, reduction, loss_final, stream);
  }
}

template <typename scalar_t, typename acc_t>
void launch_ce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* logits,
                        const int64_t* target, const acc_t* lse, int64_t B, int64_t V,
                        int64_t ignore_index, acc_t eps, scalar_t* grad, long long* count_buf,
                        IndexErrorRecord err, cudaStream_t stream) {
  if (B == 0 || V == 0) return;
  const int blocks = ce_backward_blocks(B, V);
  const bool use_count = needs_count_buffer(reduction, B, blocks);
  TORCH_CHECK(!use_count || count_buf != nullptr, "charmlp: cross_entropy_backward needs a count buffer");
  if (use_count) {
    count_targets_kernel<int64_t><<<1, 1024, 0, stream>>>(target, B, ignore_index, count_buf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  ce_backward_kernel<scalar_t, acc_t><<<blocks, kElemThreads, 0, stream>>>(
      grad_loss, reduction, use_count ? count_buf : nullptr, logits, target, lse, B, V,
      ignore_index, eps, grad, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                      \
  template void launch_ce_forward<scalar_t, acc_t>(                                              \
      const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, int64_t, acc_t*,         \
      scalar_t*, acc_t*, long long*, scalar_t*, int, IndexErrorRecord, cudaStream_t);             \
  template void launch_ce_backward<scalar_t, acc_t>(const acc_t*, int64_t, const scalar_t*,      \
                                                    const int64_t*, const acc_t*, int64_t,        \
                                                    int64_t, int64_t, acc_t, scalar_t*,           \
                                                    long long*, IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

}  // namespace cuda
}  // namespace charmlp
