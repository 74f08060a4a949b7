// Host side of the CUDA mlp_sgd_step: picks the single-kernel fused step (small
// batches, V <= 32) or composes the per-layer CUDA kernels plus one SGD update
// kernel, then reports index errors. Kernels and math: mlp_sgd_step_kernels.cu.
#include <torch/library.h>

#include <array>
#include <limits>

#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"

namespace charmlp {
namespace cuda {

namespace {

constexpr int64_t kIgnoreIndex = -100;

at::Tensor mlp_sgd_step_cuda(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                             at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                             at::Tensor& bias2, double lr) {
  check_mlp_sgd_step_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight1.size(0);
  const auto acc_dtype = at::toOpMathType(table.scalar_type());
  const size_t acc_size = acc_dtype == at::kDouble ? 8 : 4;
  // The loss has the parameters' dtype, like the CPU op and the fake kernel (ops.py).
  at::Tensor loss = at::empty({}, table.options());
  const cudaStream_t stream = current_stream();
  if (B == 0) {  // the mean over no rows is NaN (like F.cross_entropy); every gradient is 0
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
    check_index_errors();
    return loss;
  }

  // Work on contiguous parameters; copy back only if the caller's were not.
  std::array<at::Tensor*, 5> params{&table, &weight1, &bias1, &weight2, &bias2};
  std::array<at::Tensor, 5> work;
  for (size_t i = 0; i < params.size(); ++i) work[i] = params[i]->contiguous();
  const at::Tensor idx_c = index_tensor(idx), tgt_c = index_tensor(target);

  if (sgd_step_fused_ok(B, T, V, E, H, acc_size)) {
    CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "mlp_sgd_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_sgd_step_fused<scalar_t, acc_t>(
          idx_c.const_data_ptr<int64_t>(), tgt_c.const_data_ptr<int64_t>(),
          work[0].mutable_data_ptr<scalar_t>(), work[1].mutable_data_ptr<scalar_t>(),
          work[2].mutable_data_ptr<scalar_t>(), work[3].mutable_data_ptr<scalar_t>(),
          work[4].mutable_data_ptr<scalar_t>(), static_cast<acc_t>(lr), B, T, V, E, H,
          loss.mutable_data_ptr<scalar_t>(), index_error_record(), stream);
    });
  } else {
    // General path: the per-layer kernels (no host checks in between), then one
    // multi-tensor SGD update that the device skips if any index was bad.
    const at::Tensor h = embed_linear_tanh_launch(idx_c, work[0], work[1], work[2]);
    auto [mean_loss, lse] = linear_cross_entropy_launch(h, work[3], work[4], tgt_c, kReductionMean,
                                                        kIgnoreIndex, 0.0);
    loss.copy_(mean_loss);
    auto [grad_h, grad_w2, grad_b2] = linear_cross_entropy_backward_launch(
        at::Tensor(), h, work[3], work[4], tgt_c, lse, kReductionMean, kIgnoreIndex, 0.0);
    auto [grad_table, grad_w1, grad_b1] =
        embed_linear_tanh_backward_launch(grad_h, h, idx_c, work[0], work[1]);
    const std::array<at::Tensor, 5> grads{grad_table.contiguous(), grad_w1.contiguous(),
                                          grad_b1.contiguous(), grad_w2.contiguous(),
                                          grad_b2.contiguous()};
    CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "mlp_sgd_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      SgdSegments<scalar_t> segments{};
      for (int i = 0; i < 5; ++i) {
        segments.param[i] = work[i].mutable_data_ptr<scalar_t>();
        segments.grad[i] = grads[i].const_data_ptr<scalar_t>();
        segments.n[i] = work[i].numel();
      }
      launch_sgd_update<scalar_t, acc_t>(segments, static_cast<acc_t>(lr), index_error_record(),
                                         stream);
    });
  }

  for (size_t i = 0; i < params.size(); ++i) {
    if (!work[i].is_same(*params[i])) params[i]->copy_(work[i]);
  }
  check_index_errors();
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CUDA, m) { m.impl("mlp_sgd_step", &mlp_sgd_step_cuda); }

}  // namespace cuda
}  // namespace charmlp
