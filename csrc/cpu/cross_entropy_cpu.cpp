// CPU kernels of cross_entropy (F.cross_entropy for [B, V] logits and class
// targets). The row math is in softmax_xent_row.h; this file adds the
// reductions and the ignore_index bookkeeping:
//   none: loss[b] (0 for ignored rows)      grad scale_b = grad_loss[b]
//   sum:  sum_b loss[b]                      grad scale_b = grad_loss
//   mean: sum_b loss[b] / count              grad scale_b = grad_loss / count
// where count is the number of rows whose target is not ignore_index; an
// all-ignored batch gives 0 / 0 = nan like PyTorch, and zero gradients.
// Rows are independent, so both passes are parallel over rows with one read of
// the logits each: forward saves lse [B] (not the softmax), backward rebuilds
// the probabilities from it while writing the gradient.
// cross_entropy_and_grads (a scalar loss; what autograd runs when a gradient is
// needed): the row scales are known up front, so one pass per row computes lse,
// the loss and the gradient from the same exps (row_grad_and_partial_loss).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "class_weight.h"
#include "cpu/cross_entropy_cpu.h"
#include "cpu/index_check.h"
#include "cpu/kernels.h"
#include "cpu/softmax_xent_row.h"
#include "cpu/workspace.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

namespace {
// Rows per parallel task: 256 at the character vocabulary, fewer for long rows, so that a
// batch of 32 rows of a 16 K-50 K vocabulary is split over the threads too (one thread
// took 0.67x F.cross_entropy's time there) while every task keeps >= ~16 K logits.
int64_t row_grain(int64_t V) {
  return std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(V, 1), 1, 256);
}

// x B x V, target B -> lse B and per-row loss B (0 for ignored rows). Rows go in
// blocks of kVectorLanes so that their logs are one vector fast_log.
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, const int64_t* target, acc_t* lse, acc_t* loss, int64_t B,
                  int64_t V, int64_t ignore_index, acc_t eps) {
  at::parallel_for(0, B, row_grain(V), [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = b0; r0 < b1; r0 += kVectorLanes) {
      const int64_t n = std::min<int64_t>(kVectorLanes, b1 - r0);
      acc_t s[kVectorLanes];
      for (int64_t r = 0; r < n; r += kRowsInFlight) {  // lse <- max
        rows_sumexp<scalar_t, acc_t>(x + (r0 + r) * V, V, std::min(kRowsInFlight, n - r), V,
                                     lse + r0 + r, s + r);
      }
      finish_logsumexp<acc_t>(n, lse + r0, s);
      for (int64_t b = r0; b < r0 + n; ++b) {
        const int64_t t = target[b];
        loss[b] = t == ignore_index ? acc_t(0)
                                    : row_loss<scalar_t, acc_t>(x + b * V, V, t, lse[b], eps);
      }
    }
  });
}
// x B x V, target B, scale B (0 for ignored rows) -> lse B, per-row loss B and the
// gradient B x V (in grad's dtype), from one exp per logit; rows in blocks of
// kVectorLanes for their logs like forward_rows.
template <typename scalar_t, typename acc_t>
void forward_backward_rows(const scalar_t* x, const int64_t* target, const acc_t* scale,
                           acc_t* lse, acc_t* loss, scalar_t* grad, int64_t B, int64_t V,
                           int64_t ignore_index, acc_t eps) {
  at::parallel_for(0, B, row_grain(V), [&](int64_t b0, int64_t b1) {
    // float32/64 write the gradient row directly; reduced precision goes through an
    // acc_t row.
    acc_t* work = std::is_same_v<scalar_t, acc_t> ? nullptr
                                                  : thread_scratch<acc_t>(Scratch::kChunkC, V);
    for (int64_t r0 = b0; r0 < b1; r0 += kVectorLanes) {
      const int64_t n = std::min<int64_t>(kVectorLanes, b1 - r0);
      acc_t s[kVectorLanes];
      bool ignored[kVectorLanes];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = r0 + i;
        const scalar_t* row = x + b * V;
        scalar_t* g = grad + b * V;
        const int64_t t = target[b];
        ignored[i] = t == ignore_index;
        if (ignored[i]) {
          s[i] = row_sumexp<scalar_t, acc_t>(row, V, lse + b);
          loss[b] = acc_t(0);
          std::fill_n(g, V, scalar_t(0));
        } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
          s[i] = row_grad_and_partial_loss<acc_t>(row, g, V, t, eps, scale[b], lse + b, loss + b);
        } else {
          for (int64_t v = 0; v < V; ++v) work[v] = static_cast<acc_t>(row[v]);
          s[i] = row_grad_and_partial_loss<acc_t>(work, work, V, t, eps, scale[b], lse + b,
                                                  loss + b);
          for (int64_t v = 0; v < V; ++v) g[v] = static_cast<scalar_t>(work[v]);
        }
      }
      finish_row_losses<acc_t>(n, s, /*weight=*/nullptr, ignored, lse + r0, loss + r0);
    }
  });
}
}  // namespace

int64_t count_targets_cpu(const at::Tensor& target64, int64_t ignore_index) {
  const int64_t* t = target64.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t b = 0, B = target64.numel(); b < B; ++b) count += t[b] != ignore_index;
  return count;
}

int64_t mean_count_cpu(const at::Tensor& target64, int64_t reduction, int64_t ignore_index) {
  return reduction == at::Reduction::Mean ? count_targets_cpu(target64, ignore_index) : 0;
}

// Plain loops rather than ATen ops: at small batches each ATen call costs more
// than the whole reduction. The sum is sequential in double, so deterministic.
at::Tensor reduce_row_losses(const at::Tensor& row_loss, int64_t reduction, int64_t count,
                             at::ScalarType out_dtype) {
  if (reduction == at::Reduction::None) return row_loss.to(out_dtype);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "reduce_row_losses", [&] {
    const scalar_t* p = row_loss.const_data_ptr<scalar_t>();
    for (int64_t b = 0, B = row_loss.numel(); b < B; ++b) total += static_cast<double>(p[b]);
  });
  if (reduction == at::Reduction::Mean) total /= static_cast<double>(count);  // 0 / 0 = nan
  return at::scalar_tensor(total, row_loss.options().dtype(out_dtype));
}

// With class weights the row kernels run unsmoothed and class_weight.h does the rest.
std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits,
                                                     const at::Tensor& target, int64_t reduction,
                                                     int64_t ignore_index, double label_smoothing,
                                                     const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  const int64_t B = logits.size(0), V = logits.size(1);
  check_class_weight(weight, V, logits, "logits");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", ignore_index);
  const at::Tensor x = logits.contiguous();
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  const auto cw = make_class_weight(weight, target64, ignore_index, label_smoothing, acc_dtype);
  const double eps = cw ? 0.0 : label_smoothing;
  at::Tensor lse = at::empty({B}, logits.options().dtype(acc_dtype));
  at::Tensor row_loss = at::empty({B}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), target64.const_data_ptr<int64_t>(),
                                  lse.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>(),
                                  B, V, ignore_index, static_cast<acc_t>(eps));
  });
  if (cw) {
    const at::Tensor xw = cw->eps() != 0.0 ? x.to(acc_dtype).mv(cw->weight()) : at::Tensor();
    return {cw->reduce(cw->row_losses(row_loss, lse, xw), reduction, logits.scalar_type()), lse};
  }
  const int64_t count = mean_count_cpu(target64, reduction, ignore_index);
  return {reduce_row_losses(row_loss, reduction, count, logits.scalar_type()), lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target, const at::Tensor& lse,
                                      int64_t reduction, int64_t ignore_index,
                                      double label_smoothing,
                                      const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  check_saved_lse(lse, logits, "logits");
  check_grad_loss(grad_loss, reduction, B);
  check_class_weight(weight, V, logits, "logits");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", ignore_index);
  const at::Tensor x = logits.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad = at::empty({B, V}, logits.options());
  if (B == 0) return grad;
  const auto cw = make_class_weight(weight, target64, ignore_index, label_smoothing, acc_dtype);
  const at::Tensor base = cw ? cw->base_scales(grad_loss, reduction) : at::Tensor();
  const at::Tensor scales =
      cw ? cw->kernel_scales(base)
         : row_grad_scales(grad_loss, target64, reduction, ignore_index,
                           mean_count_cpu(target64, reduction, ignore_index), acc_dtype);
  const double label_eps = cw ? 0.0 : label_smoothing;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = target64.const_data_ptr<int64_t>();
    const acc_t* lp = lse_c.const_data_ptr<acc_t>();
    const acc_t* sp = scales.const_data_ptr<acc_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(label_eps);
    at::parallel_for(0, B, row_grain(V), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t = tp[b];
        if (t == ignore_index) {
          std::fill_n(gp + b * V, V, scalar_t(0));
          continue;
        }
        row_grad<scalar_t, acc_t, scalar_t>(xp + b * V, V, t, lp[b], eps, sp[b], gp + b * V);
      }
    });
  });
  if (cw) cw->add_smoothing_to_grad_logits(grad, base);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  check_scalar_loss_reduction(reduction, "cross_entropy_and_grads");
  const int64_t B = logits.size(0), V = logits.size(1);
  check_class_weight(weight, V, logits, "logits");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", ignore_index);
  const at::Tensor x = logits.contiguous();
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor lse = at::empty({B}, logits.options().dtype(acc_dtype));
  at::Tensor row_loss = at::empty({B}, lse.options());
  at::Tensor grad = at::empty({B, V}, logits.options());
  const auto cw = make_class_weight(weight, target64, ignore_index, label_smoothing, acc_dtype);
  const int64_t count = cw ? 0 : mean_count_cpu(target64, reduction, ignore_index);
  const at::Tensor base = cw ? cw->base_scales(at::Tensor(), reduction) : at::Tensor();
  const at::Tensor scales =
      cw ? cw->kernel_scales(base)
         : row_grad_scales(at::Tensor(), target64, reduction, ignore_index, count, acc_dtype);
  const double eps = cw ? 0.0 : label_smoothing;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_and_grads_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_backward_rows<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), target64.const_data_ptr<int64_t>(),
        scales.const_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
        row_loss.mutable_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>(), B, V, ignore_index,
        static_cast<acc_t>(eps));
  });
  if (cw) {
    const at::Tensor xw = cw->eps() != 0.0 ? x.to(acc_dtype).mv(cw->weight()) : at::Tensor();
    cw->add_smoothing_to_grad_logits(grad, base);
    return {cw->reduce(cw->row_losses(row_loss, lse, xw), reduction, logits.scalar_type()), lse,
            grad};
  }
  return {reduce_row_losses(row_loss, reduction, count, logits.scalar_type()), lse, grad};
}

// Per-row gradient scale [B] in acc dtype: 0 for ignored rows.
at::Tensor row_grad_scales(const at::Tensor& grad_loss, const at::Tensor& target64,
                           int64_t reduction, int64_t ignore_index, int64_t count,
                           at::ScalarType acc_dtype) {
  const int64_t B = target64.numel();
  at::Tensor scales = at::empty({B}, target64.options().dtype(acc_dtype));
  const at::Tensor g = grad_loss.defined() ? grad_loss.to(acc_dtype).contiguous() : at::Tensor();
  const int64_t* t = target64.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "row_grad_scales", [&] {
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scales.mutable_data_ptr<scalar_t>();
    scalar_t uniform = reduction == at::Reduction::None ? scalar_t(0) : (gp ? gp[0] : scalar_t(1));
    if (reduction == at::Reduction::Mean) {
      uniform = count > 0 ? uniform / static_cast<scalar_t>(count) : scalar_t(0);
    }
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t s = reduction != at::Reduction::None ? uniform : (gp ? gp[b] : scalar_t(1));
      sp[b] = t[b] == ignore_index ? scalar_t(0) : s;
    }
  });
  return scales;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
