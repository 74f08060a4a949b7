// Reduction helpers of the CPU cross-entropy family, shared by cross_entropy,
// linear_cross_entropy and mlp_sgd_step.
#pragma once

#include "cpu/capability.h"

#include <ATen/ATen.h>

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Number of rows whose target is not ignore_index.  target64: contiguous int64 [B]
int64_t count_targets_cpu(const at::Tensor& target64, int64_t ignore_index);

// What a 'mean' divides by: count_targets_cpu for reduction mean, 0 (unused) otherwise.
int64_t mean_count_cpu(const at::Tensor& target64, int64_t reduction, int64_t ignore_index);

// Applies the reduction to per-row losses (0 on ignored rows); mean divides by count.
at::Tensor reduce_row_losses(const at::Tensor& row_loss, int64_t reduction, int64_t count,
                             at::ScalarType out_dtype);

// d(reduced loss)/d(row loss) for every row, [B] in acc_dtype, 0 on ignored rows; count
// from mean_count_cpu. An undefined grad_loss means 1: the scales of the loss itself,
// which the *_and_grads ops know before their forward.
at::Tensor row_grad_scales(const at::Tensor& grad_loss, const at::Tensor& target64,
                           int64_t reduction, int64_t ignore_index, int64_t count,
                           at::ScalarType acc_dtype);

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
