// Argument validation shared by every backend of every charmlp op.
//
// Each check raises a c10::Error (a Python RuntimeError / ValueError / IndexError)
// whose message names the offending argument and its bad value, so a user never
// has to guess which tensor was wrong. Range checks on index tensors live in the
// backends (they need to read the data), but their message format lives here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <utility>
#include <string>

namespace charmlp {

inline std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                   "charmlp: ", name, " must be an int64 or int32 tensor of class indices, got ",
                   t.scalar_type());
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "charmlp: ", name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "charmlp: ", b_name, " is on ", b.device(), " but ",
              a_name, " is on ", a.device(), "; move them to the same device");
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "charmlp: ", b_name, " has dtype ",
                   b.scalar_type(), " but ", a_name, " has dtype ", a.scalar_type(),
                   "; they must match");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "charmlp: ", name, " must be ", dim, "-D ", layout,
                    ", got shape ", shape_str(t));
}

// idx [B, T], table [V, E], weight [H, T*E], bias [H] or None. The whole-model ops
// call their first layer's weight and bias weight1 and bias1 (the names in messages).
inline void check_embed_linear_tanh_args(const at::Tensor& idx, const at::Tensor& table,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const char* weight_name = "weight",
                                         const char* bias_name = "bias") {
  check_index_tensor(idx, "idx");
  check_dim(idx, 2, "idx", "[B, T]");
  check_float_tensor(table, "table");
  check_dim(table, 2, "table", "[V, E]");
  check_dim(weight, 2, weight_name, "[H, T*E]");
  check_same_dtype(table, "table", weight, weight_name);
  check_same_device(table, "table", weight, weight_name);
  check_same_device(table, "table", idx, "idx");
  const int64_t T = idx.size(1), E = table.size(1);
  TORCH_CHECK_VALUE(weight.size(1) == T * E, "charmlp: ", weight_name,
                    " must have shape [H, T*E] = [H, ", T * E, "] for idx ", shape_str(idx),
                    " and table ", shape_str(table), ", got ", shape_str(weight));
  TORCH_CHECK_VALUE(table.size(0) > 0 || idx.numel() == 0,
                    "charmlp: table has no rows, so no index in idx can be valid");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_dim(b, 1, bias_name, "[H]");
    TORCH_CHECK_VALUE(b.size(0) == weight.size(0), "charmlp: ", bias_name,
                      " must have shape [H] = [", weight.size(0), "], got ", shape_str(b));
    check_same_dtype(table, "table", b, bias_name);
    check_same_device(table, "table", b, bias_name);
  }
}

// grad_out [B, H], out [B, H], plus the forward's inputs.
inline void check_embed_linear_tanh_backward_args(const at::Tensor& grad_out, const at::Tensor& out,
                                                  const at::Tensor& idx, const at::Tensor& table,
                                                  const at::Tensor& weight) {
  check_embed_linear_tanh_args(idx, table, weight, std::nullopt);
  const int64_t B = idx.size(0), H = weight.size(0);
  for (const auto* t : {&grad_out, &out}) {
    const char* name = t == &grad_out ? "grad_out" : "out";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == H, "charmlp: ", name,
                      " must have shape [B, H] = [", B, ", ", H, "], got ", shape_str(*t));
    check_same_dtype(table, "table", *t, name);
    check_same_device(table, "table", *t, name);
  }
}

// reduction codes follow ATen's at::Reduction enum: 0 none, 1 mean, 2 sum.
inline void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "charmlp: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Ops that return the gradients of a scalar loss need reduction mean or sum.
inline void check_scalar_loss_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK_VALUE(reduction == 1 || reduction == 2, "charmlp: ", op,
                    " returns the gradients of a scalar loss: reduction must be 1 (mean) or 2 "
                    "(sum), got ", reduction);
}

// target [B] next to a [B, *] float tensor `ref`, plus the loss options.
inline void check_target_and_loss_options(const at::Tensor& target, const at::Tensor& ref,
                                          const char* ref_name, int64_t reduction,
                                          double label_smoothing) {
  check_index_tensor(target, "target");
  check_dim(target, 1, "target", "[B]");
  TORCH_CHECK_VALUE(target.size(0) == ref.size(0), "charmlp: target must have shape [B] = [",
                    ref.size(0), "] to match ", ref_name, " ", shape_str(ref), ", got ",
                    shape_str(target));
  check_same_device(ref, ref_name, target, "target");
  check_reduction(reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "charmlp: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// lse: the [B] float32/64 tensor a loss forward returned for the float tensor `ref` [B, *].
inline void check_saved_lse(const at::Tensor& lse, const at::Tensor& ref, const char* ref_name) {
  const auto acc = at::toOpMathType(ref.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == ref.size(0) && lse.scalar_type() == acc,
                    "charmlp: lse must be the [B] ", acc, " tensor returned by the forward, got ",
                    lse.scalar_type(), " of shape ", shape_str(lse));
  check_same_device(ref, ref_name, lse, "lse");
}

// logits [B, V], target [B].
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                     int64_t reduction, double label_smoothing) {
  check_float_tensor(logits, "logits");
  check_dim(logits, 2, "logits", "[B, V]");
  check_target_and_loss_options(target, logits, "logits", reduction, label_smoothing);
  TORCH_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0,
                    "charmlp: logits has no classes (V = 0), so no target can be valid");
}

// grad_loss: [B] for reduction none, one element otherwise.
inline void check_grad_loss(const at::Tensor& grad_loss, int64_t reduction, int64_t B) {
  if (reduction == at::Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B,
                      "charmlp: grad_loss must have shape [B] = [", B,
                      "] for reduction none, got ", shape_str(grad_loss));
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "charmlp: grad_loss must be a scalar for reduction ",
                      reduction == at::Reduction::Mean ? "mean" : "sum", ", got shape ",
                      shape_str(grad_loss));
  }
}

// input [B, H], weight [V, H], bias [V] or None, target [B].
inline void check_linear_cross_entropy_args(const at::Tensor& input, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const at::Tensor& target, int64_t reduction,
                                            double label_smoothing) {
  check_float_tensor(input, "input");
  check_dim(input, 2, "input", "[B, H]");
  check_dim(weight, 2, "weight", "[V, H]");
  check_same_dtype(input, "input", weight, "weight");
  check_same_device(input, "input", weight, "weight");
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "charmlp: weight must have shape [V, H] = [V, ",
                    input.size(1), "] to match input ", shape_str(input), ", got ",
                    shape_str(weight));
  if (bias.has_value()) {
    check_dim(*bias, 1, "bias", "[V]");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "charmlp: bias must have shape [V] = [",
                      weight.size(0), "], got ", shape_str(*bias));
    check_same_dtype(input, "input", *bias, "bias");
    check_same_device(input, "input", *bias, "bias");
  }
  check_target_and_loss_options(target, input, "input", reduction, label_smoothing);
  TORCH_CHECK_VALUE(weight.size(0) > 0 || input.size(0) == 0,
                    "charmlp: weight has no rows (V = 0), so no target can be valid");
}

// The whole-model ops: idx [B, T], target [B], table [V, E], weight1 [H, T*E],
// bias1 [H], weight2 [V, H], bias2 [V].
inline void check_mlp_args(const at::Tensor& idx, const at::Tensor& target,
                           const at::Tensor& table, const at::Tensor& weight1,
                           const at::Tensor& bias1, const at::Tensor& weight2,
                           const at::Tensor& bias2) {
  check_embed_linear_tanh_args(idx, table, weight1, bias1, "weight1", "bias1");
  check_dim(weight2, 2, "weight2", "[V, H]");
  const int64_t V = table.size(0), H = weight1.size(0);
  TORCH_CHECK_VALUE(weight2.size(0) == V && weight2.size(1) == H,
                    "charmlp: weight2 must have shape [V, H] = [", V, ", ", H, "], got ",
                    shape_str(weight2));
  check_dim(bias2, 1, "bias2", "[V]");
  TORCH_CHECK_VALUE(bias2.size(0) == V, "charmlp: bias2 must have shape [V] = [", V, "], got ",
                    shape_str(bias2));
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&weight2, "weight2"},
                                {&bias2, "bias2"}}) {
    check_same_dtype(table, "table", *t, name);
    check_same_device(table, "table", *t, name);
  }
  check_index_tensor(target, "target");
  check_dim(target, 1, "target", "[B]");
  TORCH_CHECK_VALUE(target.size(0) == idx.size(0), "charmlp: target must have shape [B] = [",
                    idx.size(0), "] to match idx ", shape_str(idx), ", got ", shape_str(target));
  check_same_device(table, "table", target, "target");
}

inline void check_mlp_sgd_step_args(const at::Tensor& idx, const at::Tensor& target,
                                    const at::Tensor& table, const at::Tensor& weight1,
                                    const at::Tensor& bias1, const at::Tensor& weight2,
                                    const at::Tensor& bias2, double lr) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  TORCH_CHECK_VALUE(std::isfinite(lr), "charmlp: lr must be finite, got ", lr);
}

// mlp_sgd_steps: idx [K, B, T], target [K, B], one finite lr per step; each step's
// slices and the parameters as for mlp_sgd_step.
inline void check_mlp_sgd_steps_args(const at::Tensor& idx, const at::Tensor& target,
                                     const at::Tensor& table, const at::Tensor& weight1,
                                     const at::Tensor& bias1, const at::Tensor& weight2,
                                     const at::Tensor& bias2, c10::ArrayRef<double> lr) {
  check_index_tensor(idx, "idx");
  check_dim(idx, 3, "idx", "[K, B, T] (K steps of B rows)");
  check_index_tensor(target, "target");
  check_dim(target, 2, "target", "[K, B]");
  const int64_t K = idx.size(0), B = idx.size(1);
  TORCH_CHECK_VALUE(target.size(0) == K && target.size(1) == B,
                    "charmlp: target must have shape [K, B] = [", K, ", ", B, "] to match idx ",
                    shape_str(idx), ", got ", shape_str(target));
  TORCH_CHECK_VALUE(static_cast<int64_t>(lr.size()) == K,
                    "charmlp: lr must hold one learning rate per step (K = ", K, "), got ",
                    lr.size());
  for (size_t k = 0; k < lr.size(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(lr[k]), "charmlp: lr[", k, "] must be finite, got ", lr[k]);
  }
  // The rest as for one step (messages then show one step's [B, T] and [B]).
  const bool any = K > 0;
  check_mlp_args(any ? idx[0] : idx.flatten(0, 1), any ? target[0] : target.flatten(0, 1), table,
                 weight1, bias1, weight2, bias2);
}

// The message for an index outside [0, bound): shared so CPU and CUDA say the same thing.
[[noreturn]] inline void throw_index_out_of_range(const char* name, int64_t value, int64_t bound,
                                                  int64_t position) {
  TORCH_CHECK_INDEX(false, "charmlp: ", name, " contains ", value, " at flat position ", position,
                    ", outside the valid range [0, ", bound, ")");
}

}  // namespace charmlp
