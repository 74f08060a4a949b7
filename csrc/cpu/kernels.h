// The CPU kernels of every op: declared once per capability (cpu/capability.h), and
// the table of one capability's entry points that cpu_dispatch.cpp registers with
// the dispatcher. Shapes and semantics: the schemas in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

#include "cpu/capability.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// embed_linear_tanh_cpu.cpp
at::Tensor embed_linear_tanh_cpu(const at::Tensor& idx, const at::Tensor& table,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight);

// cross_entropy_cpu.cpp
std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits,
                                                     const at::Tensor& target, int64_t reduction,
                                                     int64_t ignore_index, double label_smoothing,
                                                     const std::optional<at::Tensor>& weight);
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target, const at::Tensor& lse,
                                      int64_t reduction, int64_t ignore_index,
                                      double label_smoothing,
                                      const std::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight);

// linear_cross_entropy_cpu.cpp
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_and_grads_cpu(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing,
                                   const std::optional<at::Tensor>& class_weight);

// mlp_cpu.cpp
at::Tensor mlp_cross_entropy_cpu(const at::Tensor& idx, const at::Tensor& target,
                                 const at::Tensor& table, const at::Tensor& weight1,
                                 const at::Tensor& bias1, const at::Tensor& weight2,
                                 const at::Tensor& bias2);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_cross_entropy_and_grads_cpu(const at::Tensor& idx, const at::Tensor& target,
                                const at::Tensor& table, const at::Tensor& weight1,
                                const at::Tensor& bias1, const at::Tensor& weight2,
                                const at::Tensor& bias2);
std::tuple<at::Tensor, at::Tensor> mlp_logits_cross_entropy_cpu(
    const at::Tensor& idx, const at::Tensor& target, const at::Tensor& table,
    const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_logits_cross_entropy_and_grads_cpu(const at::Tensor& idx, const at::Tensor& target,
                                       const at::Tensor& table, const at::Tensor& weight1,
                                       const at::Tensor& bias1, const at::Tensor& weight2,
                                       const at::Tensor& bias2);
at::Tensor mlp_sgd_step_cpu(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                            at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                            at::Tensor& bias2, double lr);
at::Tensor mlp_sgd_steps_cpu(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                             at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                             at::Tensor& bias2, c10::ArrayRef<double> lr);

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY

// X(op): every op with a CPU kernel, named as in its schema; its kernel is op##_cpu.
#define CHARMLP_FOR_EACH_CPU_OP(X)                                                        \
  X(embed_linear_tanh) X(embed_linear_tanh_backward)                                      \
  X(cross_entropy) X(cross_entropy_backward) X(cross_entropy_and_grads)                   \
  X(linear_cross_entropy) X(linear_cross_entropy_backward)                                \
  X(linear_cross_entropy_and_grads)                                                       \
  X(mlp_cross_entropy) X(mlp_cross_entropy_and_grads) X(mlp_logits_cross_entropy)         \
  X(mlp_logits_cross_entropy_and_grads) X(mlp_sgd_step) X(mlp_sgd_steps)

namespace charmlp {

// One capability's kernels (the signatures are the same in every capability).
struct CpuKernels {
#define CHARMLP_CPU_KERNEL_FIELD(op) decltype(&CHARMLP_CPU_CAPABILITY::op##_cpu) op;
  CHARMLP_FOR_EACH_CPU_OP(CHARMLP_CPU_KERNEL_FIELD)
#undef CHARMLP_CPU_KERNEL_FIELD
};

}  // namespace charmlp

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// This capability's table (kernel_table.cpp).
const CpuKernels& kernel_table();

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
