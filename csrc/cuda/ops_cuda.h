// Host entry points shared between the CUDA op files (plain C++: no device code).
//
// The *_launch functions validate shapes, launch on the current stream and return;
// they do NOT turn recorded index errors into exceptions (check_index_errors does,
// once per public op), so a composite op such as mlp_sgd_step pays for at most one
// check.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace charmlp {
namespace cuda {

// Scales of the cross-entropy gradient come from grad_loss, or 1 when it is undefined.
at::Tensor embed_linear_tanh_launch(const at::Tensor& idx, const at::Tensor& table,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_launch(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor> cross_entropy_launch(const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        int64_t reduction, int64_t ignore_index,
                                                        double label_smoothing);

at::Tensor cross_entropy_backward_launch(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const at::Tensor& lse,
                                         int64_t reduction, int64_t ignore_index,
                                         double label_smoothing);

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_launch(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_launch(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing);

// The kernel tour's naive kernels (kernel_impl.h; naive_cuda.cpp): the registered CUDA
// kernels of embed_linear_tanh and cross_entropy call these under set_kernel_impl("naive").
// Each runs the fast op's argument checks and raises index errors like the public op.
at::Tensor embed_linear_tanh_naive_cuda(const at::Tensor& idx, const at::Tensor& table,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_naive_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> cross_entropy_naive_cuda(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight);
at::Tensor cross_entropy_backward_naive_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                             const at::Tensor& target, const at::Tensor& lse,
                                             int64_t reduction, int64_t ignore_index,
                                             double label_smoothing,
                                             const std::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_naive_cuda(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight);

}  // namespace cuda
}  // namespace charmlp
