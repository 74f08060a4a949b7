// Class weights of the cross-entropy ops (F.cross_entropy's weight=), applied around the
// unweighted row kernels, on any device: only ATen ops here, shared by the CPU and CUDA
// backends.
//
// With class weights w [V], row b with target t (not ignored) and label smoothing eps,
// PyTorch's loss is
//   loss_b = (1 - eps) w_t (lse - x_t) + (eps / V) sum_v w_v (lse - x_v)
//          = (1 - eps) w_t L0_b + (eps / V) (S lse - x_b . w),     S = sum_v w_v,
// where L0_b = lse - x_t is the unsmoothed row loss, and 'mean' divides the sum by
// sum_b w_{t_b} over the rows not ignored (not by their count). Its gradient is
//   dloss_b/dx_v = a_b p_v - (1 - eps) w_t [v == t] - (eps / V) w_v,
//   a_b = (1 - eps) w_t + (eps / V) S.
// So the row kernels run unsmoothed (eps = 0) with row scales s_b a_b, which gives
// s_b a_b (p_v - [v == t]); what is left, s_b (eps / V) (S [v == t] - w_v), is zero
// without smoothing and otherwise one scatter and one rank-1 term, which for the
// linear head pass through the GEMMs as a gathered row of W and two matrix-vector
// products. Nothing [B, V] is added to what the unweighted op allocates.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>

#include <optional>

#include "checks.h"

namespace charmlp {

// weight: [V] floating point, on ref's device.
inline void check_class_weight(const std::optional<at::Tensor>& weight, int64_t V,
                               const at::Tensor& ref, const char* ref_name) {
  if (!weight) return;
  check_float_tensor(*weight, "weight");
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == V,
                    "charmlp: weight (the class weights) must have shape [V] = [", V, "], got ",
                    shape_str(*weight));
  check_same_device(ref, ref_name, *weight, "weight");
}

class ClassWeight {
 public:
  // target64: int64 [B]; acc: the dtype the kernels accumulate in. Targets out of range
  // are clamped here so that no gather faults before the kernels report them (the CUDA
  // ones raise after their launch).
  ClassWeight(const at::Tensor& weight, const at::Tensor& target64, int64_t ignore_index,
              double label_smoothing, at::ScalarType acc)
      : eps_(label_smoothing), V_(weight.size(0)) {
    w_ = weight.to(acc).contiguous();
    counted_ = target64.ne(ignore_index);
    safe_target_ = target64.masked_fill(counted_.logical_not(), 0).clamp(0, V_ - 1);
    counted_acc_ = counted_.to(acc);
    row_weight_ = w_.index_select(0, safe_target_) * counted_acc_;
    weight_sum_ = w_.sum();
    denominator_ = row_weight_.sum();
  }

  double eps() const { return eps_; }

  // d(reduced loss)/d(row loss) [B] (0 on ignored rows) from grad_loss (undefined: 1).
  // A 'mean' whose weights sum to 0 gives zero gradients (as an all-ignored batch does).
  at::Tensor base_scales(const at::Tensor& grad_loss, int64_t reduction) const {
    at::Tensor g = grad_loss.defined() ? grad_loss.to(w_.scalar_type()).reshape({-1})
                                       : at::ones({1}, w_.options());
    if (reduction == at::Reduction::Mean) {
      g = at::where(denominator_ != 0, g / denominator_, at::zeros_like(g));
    }
    return g * counted_acc_;  // broadcasts the scalar of mean / sum to [B]
  }

  // What the unsmoothed row kernels multiply row b by: s_b a_b.
  at::Tensor kernel_scales(const at::Tensor& base) const {
    return base * (row_weight_ * (1.0 - eps_) + weight_sum_ * (eps_ / V_));
  }

  // loss_b from the unsmoothed row losses L0 [B], lse [B] and, with smoothing, x . w
  // (xw [B]; undefined without smoothing); 0 on ignored rows.
  at::Tensor row_losses(const at::Tensor& L0, const at::Tensor& lse, const at::Tensor& xw) const {
    at::Tensor loss = L0.to(w_.scalar_type()) * row_weight_ * (1.0 - eps_);
    if (eps_ != 0.0) loss = loss + (lse * weight_sum_ - xw) * counted_acc_ * (eps_ / V_);
    return loss;
  }

  // The reduction of row_losses, in out_dtype.
  at::Tensor reduce(const at::Tensor& row_loss, int64_t reduction, at::ScalarType out_dtype) const {
    if (reduction == at::Reduction::None) return row_loss.to(out_dtype);
    at::Tensor total = row_loss.sum();
    if (reduction == at::Reduction::Mean) total = total / denominator_;  // 0 / 0 = nan
    return total.to(out_dtype);
  }

  // The class weights in the accumulation dtype, [V].
  const at::Tensor& weight() const { return w_; }

  // grad_logits [B, V] += s_b (eps / V) (S [v == t_b] - w_v), in place.
  void add_smoothing_to_grad_logits(at::Tensor& grad, const at::Tensor& base) const {
    if (eps_ == 0.0) return;
    const at::Tensor hit = (base * weight_sum_ * (eps_ / V_)).to(grad.scalar_type());
    grad.scatter_add_(1, safe_target_.unsqueeze(1), hit.unsqueeze(1));
    grad.addr_(base.to(grad.scalar_type()), w_.to(grad.scalar_type()), 1.0, -eps_ / V_);
  }

  // The same term through logits = input @ weight^T + bias: with D the [B, V] term above,
  // grad_input += D W, grad_weight += D^T input, grad_bias += colsum(D). All [B, V]-free.
  void add_smoothing_to_linear_grads(const at::Tensor& base, const at::Tensor& input,
                                     const at::Tensor& weight, at::Tensor& grad_input,
                                     at::Tensor& grad_weight, at::Tensor& grad_bias) const {
    if (eps_ == 0.0) return;
    const auto dt = grad_input.scalar_type();
    const double smooth = -eps_ / V_;
    const at::Tensor hit = base * weight_sum_ * (eps_ / V_);  // [B]
    const at::Tensor x = input.to(w_.scalar_type()), W = weight.to(w_.scalar_type());
    // D W = hit_b W[t_b] - (eps / V) s_b (w^T W)
    grad_input.add_((W.index_select(0, safe_target_) * hit.unsqueeze(1)).to(dt));
    grad_input.addr_(base.to(dt), W.t().mv(w_).to(dt), 1.0, smooth);
    // D^T input = hit_b x_b added to row t_b, - (eps / V) w (s^T input)
    grad_weight.index_add_(0, safe_target_, (x * hit.unsqueeze(1)).to(dt));
    grad_weight.addr_(w_.to(dt), x.t().mv(base).to(dt), 1.0, smooth);
    if (!grad_bias.defined()) return;
    grad_bias.index_add_(0, safe_target_, hit.to(dt));
    grad_bias.sub_((w_ * base.sum() * (eps_ / V_)).to(dt));
  }

 private:
  double eps_;
  int64_t V_;
  at::Tensor w_, counted_, counted_acc_, safe_target_, row_weight_, weight_sum_, denominator_;
};

inline std::optional<ClassWeight> make_class_weight(const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& target64,
                                                    int64_t ignore_index, double label_smoothing,
                                                    at::ScalarType acc) {
  if (!weight) return std::nullopt;
  return ClassWeight(*weight, target64, ignore_index, label_smoothing, acc);
}

}  // namespace charmlp
