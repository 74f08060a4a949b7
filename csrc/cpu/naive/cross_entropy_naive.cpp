// cross_entropy, naive CPU version (the kernel tour's version 1; kernel_impl.h).
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
// Without weights: loss[b] = lse - (1 - eps) x_t - (eps / V) sum_v x_v and
// grad = s_b (p - (1 - eps) [v == t] - eps / V), as F.cross_entropy.
// cross_entropy_and_grads is the forward, then the backward with grad_loss = 1.
// The fast version (cross_entropy_cpu.cpp) works in 16-lane vector blocks with a vectorized
// exp and log, and for a scalar loss makes one pass and one exp per logit instead of three.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "class_weight.h"
#include "cpu/index_check.h"
#include "cpu/naive/naive_cpu.h"

namespace charmlp::naive {

using CHARMLP_CPU_CAPABILITY::checked_indices_cpu;  // the fast kernels' index check

namespace {

// w[v], or 1 without class weights (w == nullptr).
template <typename acc_t>
acc_t class_weight(const acc_t* w, int64_t v) {
  return w != nullptr ? w[v] : acc_t(1);
}

// -> lse[b] and loss[b] for every row.   x (B, V), target (B), w (V) or null
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, const int64_t* target, const acc_t* w, acc_t* lse,
                  acc_t* loss, int64_t B, int64_t V, int64_t ignore_index, acc_t eps) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {  // rows are independent
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* row = x + b * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<acc_t>(row[v]));
      acc_t s = 0;  // a NaN logit makes s, lse and the loss NaN, as in PyTorch
      for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<acc_t>(row[v]) - m);
      lse[b] = m + std::log(s);
      const int64_t t = target[b];
      if (t == ignore_index) {
        loss[b] = 0;
        continue;
      }
      acc_t l = (1 - eps) * class_weight(w, t) * (lse[b] - static_cast<acc_t>(row[t]));
      if (eps != 0) {
        acc_t smooth = 0;
        for (int64_t v = 0; v < V; ++v) {
          smooth += class_weight(w, v) * (lse[b] - static_cast<acc_t>(row[v]));
        }
        l += eps / static_cast<acc_t>(V) * smooth;
      }
      loss[b] = l;
    }
  });
}

// sum_b w[t_b] over the rows not ignored: what mean divides by (their count without weights).
template <typename acc_t>
acc_t mean_denominator(const int64_t* target, const acc_t* w, int64_t B, int64_t ignore_index) {
  acc_t den = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (target[b] != ignore_index) den += class_weight(w, target[b]);
  }
  return den;
}

// The loss tensor: loss[b] (none), or their sum in order (sum), over den (mean; 0 / 0 = nan).
// The sum over the batch is in double: in float its rounding error would grow with B.
template <typename acc_t>
at::Tensor reduce(const at::Tensor& row_loss, int64_t reduction, acc_t den, at::ScalarType dtype) {
  if (reduction == at::Reduction::None) return row_loss.to(dtype);
  const acc_t* loss = row_loss.const_data_ptr<acc_t>();
  double total = 0;
  for (int64_t b = 0; b < row_loss.numel(); ++b) total += loss[b];
  if (reduction == at::Reduction::Mean) total /= static_cast<double>(den);
  return at::scalar_tensor(total, row_loss.options().dtype(dtype));
}

// -> grad (B, V).   grad_loss: (B) for none, one value otherwise.
template <typename scalar_t, typename acc_t>
void backward_rows(const acc_t* grad_loss, int64_t reduction, acc_t den, const scalar_t* x,
                   const int64_t* target, const acc_t* w, const acc_t* lse, scalar_t* grad,
                   int64_t B, int64_t V, int64_t ignore_index, acc_t eps) {
  acc_t w_sum = 0;
  for (int64_t v = 0; v < V; ++v) w_sum += class_weight(w, v);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = target[b];
      // s_b = d(loss) / d(loss[b])
      acc_t s = grad_loss[reduction == at::Reduction::None ? b : 0];
      if (reduction == at::Reduction::Mean) s = den != 0 ? s / den : acc_t(0);
      for (int64_t v = 0; v < V; ++v) {
        acc_t g = 0;
        if (t != ignore_index) {
          const acc_t wt = class_weight(w, t);
          const acc_t a = (1 - eps) * wt + eps / static_cast<acc_t>(V) * w_sum;
          const acc_t p = std::exp(static_cast<acc_t>(x[b * V + v]) - lse[b]);
          const acc_t hit = v == t ? (1 - eps) * wt : acc_t(0);
          g = s * (a * p - hit - eps / static_cast<acc_t>(V) * class_weight(w, v));
        }
        grad[b * V + v] = static_cast<scalar_t>(g);
      }
    }
  });
}

// The class weights in the accumulation dtype, or an undefined tensor.
at::Tensor weights_acc(const std::optional<at::Tensor>& weight, at::ScalarType acc_dtype) {
  return weight ? weight->to(acc_dtype).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_naive_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);  // as cross_entropy_cpu
  const int64_t B = logits.size(0), V = logits.size(1);
  check_class_weight(weight, V, logits, "logits");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", ignore_index);
  const at::Tensor x = logits.contiguous();
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  const at::Tensor w = weights_acc(weight, acc_dtype);
  at::Tensor lse = at::empty({B}, logits.options().dtype(acc_dtype));
  at::Tensor row_loss = at::empty({B}, lse.options());
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_naive_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* t = target64.const_data_ptr<int64_t>();
    forward_rows<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), t, ptr_or_null<acc_t>(w),
                                  lse.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>(),
                                  B, V, ignore_index, static_cast<acc_t>(label_smoothing));
    const acc_t den = mean_denominator<acc_t>(t, ptr_or_null<acc_t>(w), B, ignore_index);
    loss = reduce<acc_t>(row_loss, reduction, den, logits.scalar_type());
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward_naive_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                            const at::Tensor& target, const at::Tensor& lse,
                                            int64_t reduction, int64_t ignore_index,
                                            double label_smoothing,
                                            const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);  // as the fast backward
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  check_saved_lse(lse, logits, "logits");
  check_grad_loss(grad_loss, reduction, B);
  check_class_weight(weight, V, logits, "logits");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", ignore_index);
  const at::Tensor x = logits.contiguous(), lse_c = lse.contiguous();
  const at::Tensor g = grad_loss.to(acc_dtype).contiguous();
  const at::Tensor w = weights_acc(weight, acc_dtype);
  at::Tensor grad = at::empty({B, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_backward_naive_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* t = target64.const_data_ptr<int64_t>();
    const acc_t den = mean_denominator<acc_t>(t, ptr_or_null<acc_t>(w), B, ignore_index);
    backward_rows<scalar_t, acc_t>(g.const_data_ptr<acc_t>(), reduction, den,
                                   x.const_data_ptr<scalar_t>(), t, ptr_or_null<acc_t>(w),
                                   lse_c.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>(),
                                   B, V, ignore_index, static_cast<acc_t>(label_smoothing));
  });
  return grad;
}

// The forward, then the backward with grad_loss = 1 (as the naive CUDA op): a second pass
// over the logits and a second index check, so that it reads as the two ops it fuses.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_naive_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);  // as the fast op
  check_scalar_loss_reduction(reduction, "cross_entropy_and_grads");
  auto [loss, lse] =
      cross_entropy_naive_cpu(logits, target, reduction, ignore_index, label_smoothing, weight);
  at::Tensor grad = cross_entropy_backward_naive_cpu(at::ones({}, lse.options()), logits, target,
                                                     lse, reduction, ignore_index,
                                                     label_smoothing, weight);
  return {loss, lse, grad};
}

}  // namespace charmlp::naive
