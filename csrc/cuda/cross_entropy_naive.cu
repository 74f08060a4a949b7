// cross_entropy, naive CUDA version (the kernel tour's version 1; kernel_impl.h).
// Host side: naive_cuda.cpp.
//
// logits x is (B, V), target (B), class weights w (V) (all 1 without weight=),
// eps = label_smoothing. Row b with target t (a row with t == ignore_index: loss 0, grad 0):
//   m       = max_v x[b, v]                      (subtracted before exp: exp never overflows)
//   lse[b]  = m + log sum_v exp(x[b, v] - m)                                  (B), saved
//   loss[b] = (1 - eps) w[t] (lse[b] - x[b, t]) + (eps / V) sum_v w[v] (lse[b] - x[b, v])
//   loss    = loss[b] (B) for none, sum_b loss[b] () for sum, sum_b loss[b] / sum_b w[t_b] for mean
// Backward, from the saved lse (the softmax p = exp(x[b, v] - lse[b]) is never stored):
//   grad[b, v] = s_b (a_b p - (1 - eps) w[t] [v == t] - (eps / V) w[v])          (B, V)
//   a_b = (1 - eps) w[t] + (eps / V) sum_v w[v];  s_b = grad_loss[b] (none), grad_loss (sum),
//   grad_loss / sum_b w[t_b] (mean, 0 if that is 0)
// One thread per output: per row for lse and loss[b], per element for grad, and a single
// thread for each sum over the batch (in order: deterministic). Targets are read through
// load_target, which records a bad one (the host raises) and never dereferences it.
// The fast version (cross_entropy_kernels.cu) gives each row a 32-lane warp (coalesced loads,
// shuffle reductions) and sums the batch in block-wide trees; here one thread walks a row.
#include "cuda/device_common.cuh"

namespace charmlp {
namespace cuda {

namespace {

// w[v], or 1 without class weights (w == nullptr).
template <typename acc_t>
__device__ inline acc_t class_weight(const acc_t* w, int64_t v) {
  return w != nullptr ? w[v] : acc_t(1);
}

// One thread: sums[0] = sum_b w[t_b] over the rows not ignored (what mean divides by: their
// count without weights), sums[1] = sum_v w[v].
template <typename acc_t>
__global__ void naive_ce_sums_kernel(const int64_t* target, const acc_t* w, int64_t B, int64_t V,
                                     int64_t ignore_index, acc_t* sums, IndexErrorRecord err) {
  acc_t den = 0, w_sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = load_target(target, b, V, ignore_index, err);  // -1: ignored or bad
    if (t >= 0) den += class_weight(w, t);
  }
  for (int64_t v = 0; v < V; ++v) w_sum += class_weight(w, v);
  sums[0] = den;
  sums[1] = w_sum;
}

// One thread per row: lse[b] and loss[b].
template <typename scalar_t, typename acc_t>
__global__ void naive_ce_forward_kernel(const scalar_t* logits, const int64_t* target,
                                        const acc_t* w, int64_t B, int64_t V, int64_t ignore_index,
                                        acc_t eps, acc_t* lse, acc_t* row_loss,
                                        IndexErrorRecord err) {
  const int64_t b = global_thread_index();
  if (b >= B) return;
  const scalar_t* x = logits + b * V;
  acc_t m = neg_inf<acc_t>();
  for (int64_t v = 0; v < V; ++v) {
    const acc_t xv = static_cast<acc_t>(x[v]);
    m = xv > m ? xv : m;  // a NaN logit never wins, but makes s (and lse) NaN below
  }
  acc_t s = 0;
  for (int64_t v = 0; v < V; ++v) s += dev_exp(static_cast<acc_t>(x[v]) - m);
  const acc_t l = m + dev_log(s);
  lse[b] = l;
  const int64_t t = load_target(target, b, V, ignore_index, err);
  if (t < 0) {
    row_loss[b] = 0;
    return;
  }
  acc_t loss = (1 - eps) * class_weight(w, t) * (l - static_cast<acc_t>(x[t]));
  if (eps != 0) {
    acc_t smooth = 0;
    for (int64_t v = 0; v < V; ++v) smooth += class_weight(w, v) * (l - static_cast<acc_t>(x[v]));
    loss += eps / static_cast<acc_t>(V) * smooth;
  }
  row_loss[b] = loss;
}

// One thread: *loss = sum_b loss[b] (sum), / sums[0] (mean; 0 / 0 = nan like PyTorch).
template <typename scalar_t, typename acc_t>
__global__ void naive_ce_reduce_kernel(const acc_t* row_loss, int64_t B, int64_t reduction,
                                       const acc_t* sums, scalar_t* loss) {
  acc_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += row_loss[b];
  if (reduction == kReductionMean) total /= sums[0];
  *loss = static_cast<scalar_t>(total);
}

// One thread per grad[b, v]. grad_loss: (B) for none, one value otherwise, null meaning 1.
template <typename scalar_t, typename acc_t>
__global__ void naive_ce_backward_kernel(const acc_t* grad_loss, int64_t reduction,
                                         const scalar_t* logits, const int64_t* target,
                                         const acc_t* w, const acc_t* lse, const acc_t* sums,
                                         int64_t B, int64_t V, int64_t ignore_index, acc_t eps,
                                         scalar_t* grad, IndexErrorRecord err) {
  const int64_t i = global_thread_index();
  if (i >= B * V) return;
  const int64_t b = i / V, v = i % V;
  const int64_t t = load_target(target, b, V, ignore_index, err);
  acc_t g = 0;
  if (t >= 0) {
    acc_t s = grad_loss == nullptr ? acc_t(1) : grad_loss[reduction == kReductionNone ? b : 0];
    if (reduction == kReductionMean) s = sums[0] != 0 ? s / sums[0] : acc_t(0);
    const acc_t wt = class_weight(w, t);
    const acc_t a = (1 - eps) * wt + eps / static_cast<acc_t>(V) * sums[1];
    const acc_t p = dev_exp(static_cast<acc_t>(logits[i]) - lse[b]);
    const acc_t hit = v == t ? (1 - eps) * wt : acc_t(0);
    g = s * (a * p - hit - eps / static_cast<acc_t>(V) * class_weight(w, v));
  }
  grad[i] = static_cast<scalar_t>(g);
}

}  // namespace

template <typename acc_t>
void launch_naive_ce_sums(const int64_t* target, const acc_t* w, int64_t B, int64_t V,
                          int64_t ignore_index, acc_t* sums, IndexErrorRecord err,
                          cudaStream_t stream) {
  naive_ce_sums_kernel<acc_t><<<1, 1, 0, stream>>>(target, w, B, V, ignore_index, sums, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_naive_ce_forward(const scalar_t* logits, const int64_t* target, const acc_t* w,
                             int64_t B, int64_t V, int64_t ignore_index, acc_t eps,
                             int64_t reduction, const acc_t* sums, acc_t* lse, acc_t* row_loss,
                             scalar_t* loss, IndexErrorRecord err, cudaStream_t stream) {
  if (B > 0) {
    naive_ce_forward_kernel<scalar_t, acc_t><<<naive_blocks(B), kNaiveThreads, 0, stream>>>(
        logits, target, w, B, V, ignore_index, eps, lse, row_loss, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (reduction != kReductionNone) {
    naive_ce_reduce_kernel<scalar_t, acc_t><<<1, 1, 0, stream>>>(row_loss, B, reduction, sums,
                                                                  loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t>
void launch_naive_ce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* logits,
                              const int64_t* target, const acc_t* w, const acc_t* lse,
                              const acc_t* sums, int64_t B, int64_t V, int64_t ignore_index,
                              acc_t eps, scalar_t* grad, IndexErrorRecord err,
                              cudaStream_t stream) {
  if (B * V > 0) {
    naive_ce_backward_kernel<scalar_t, acc_t><<<naive_blocks(B * V), kNaiveThreads, 0, stream>>>(
        grad_loss, reduction, logits, target, w, lse, sums, B, V, ignore_index, eps, grad, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                      \
  template void launch_naive_ce_forward<scalar_t, acc_t>(                                        \
      const scalar_t*, const int64_t*, const acc_t*, int64_t, int64_t, int64_t, acc_t, int64_t,   \
      const acc_t*, acc_t*, acc_t*, scalar_t*, IndexErrorRecord, cudaStream_t);                   \
  template void launch_naive_ce_backward<scalar_t, acc_t>(                                       \
      const acc_t*, int64_t, const scalar_t*, const int64_t*, const acc_t*, const acc_t*,         \
      const acc_t*, int64_t, int64_t, int64_t, acc_t, scalar_t*, IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

template void launch_naive_ce_sums<float>(const int64_t*, const float*, int64_t, int64_t, int64_t,
                                          float*, IndexErrorRecord, cudaStream_t);
template void launch_naive_ce_sums<double>(const int64_t*, const double*, int64_t, int64_t, int64_t,
                                           double*, IndexErrorRecord, cudaStream_t);

}  // namespace cuda
}  // namespace charmlp
