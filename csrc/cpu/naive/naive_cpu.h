// The naive CPU kernels of the kernel tour (kernel_impl.h): same signatures and checks as
// the fast ones in cpu/kernels.h. Compiled once, with the library's baseline flags
// (CMakeLists.txt: CHARMLP_SOURCES), not once per capability: they are plain scalar loops
// that an instruction set would not change, and cpu_dispatch.cpp branches to them before
// it looks up the capability table.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace charmlp::naive {

// embed_linear_tanh_naive.cpp
at::Tensor embed_linear_tanh_naive_cpu(const at::Tensor& idx, const at::Tensor& table,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_naive_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight);

// cross_entropy_naive.cpp
std::tuple<at::Tensor, at::Tensor> cross_entropy_naive_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight);
at::Tensor cross_entropy_backward_naive_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                            const at::Tensor& target, const at::Tensor& lse,
                                            int64_t reduction, int64_t ignore_index,
                                            double label_smoothing,
                                            const std::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_naive_cpu(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight);

}  // namespace charmlp::naive

// X(op): the ops with a naive CPU kernel, named as in their schema; it is naive::op##_naive_cpu.
#define CHARMLP_FOR_EACH_NAIVE_CPU_OP(X)                                                  \
  X(embed_linear_tanh) X(embed_linear_tanh_backward)                                      \
  X(cross_entropy) X(cross_entropy_backward) X(cross_entropy_and_grads)
