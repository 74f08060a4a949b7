// Host side of the CUDA whole-model ops (the family of csrc/cpu/mlp_cpu.cpp):
//   mlp_cross_entropy            embed_linear_tanh -> linear_cross_entropy forwards
//   mlp_cross_entropy_and_grads  the same plus both backwards (no host checks in between)
//   mlp_logits_cross_entropy(_and_grads)
//                                the model's forward with targets: embed_linear_tanh, the
//                                logits as one GEMM (written anyway: they are an output),
//                                cross_entropy on them (and both backwards)
//   mlp_sgd_step                 the single-kernel fused step (small batches, V <= 32), or
//                                the composition above plus one multi-tensor SGD update
//   mlp_sgd_steps                K such steps from one host call (no sync in between)
// Each reports index errors once, at its end. Kernels and math: mlp_sgd_step_kernels.cu
// and the per-layer kernel files.
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>

#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"

namespace charmlp {
namespace cuda {

namespace {

constexpr int64_t kIgnoreIndex = -100;

using Params = std::array<at::Tensor, 5>;  // table, weight1, bias1, weight2, bias2

Params contiguous_params(const at::Tensor& table, const at::Tensor& weight1,
                         const at::Tensor& bias1, const at::Tensor& weight2,
                         const at::Tensor& bias2) {
  return {table.contiguous(), weight1.contiguous(), bias1.contiguous(), weight2.contiguous(),
          bias2.contiguous()};
}

// The mean loss (in the parameters' dtype) through the per-layer kernels.
// idx_c, tgt_c: contiguous int64 [B, T], [B]; p: contiguous parameters.
at::Tensor mlp_loss_launch(const at::Tensor& idx_c, const at::Tensor& tgt_c, const Params& p) {
  const at::Tensor h = embed_linear_tanh_launch(idx_c, p[0], p[1], p[2]);  // B x H
  auto [mean_loss, lse] =
      linear_cross_entropy_launch(h, p[3], p[4], tgt_c, kReductionMean, kIgnoreIndex, 0.0);
  return mean_loss.to(p[0].scalar_type());
}

// The mean loss and its five parameter gradients (contiguous, the parameters' shapes).
std::tuple<at::Tensor, Params> mlp_loss_and_grads_launch(const at::Tensor& idx_c,
                                                         const at::Tensor& tgt_c,
                                                         const Params& p) {
  const at::Tensor h = embed_linear_tanh_launch(idx_c, p[0], p[1], p[2]);  // B x H
  auto [mean_loss, lse] =
      linear_cross_entropy_launch(h, p[3], p[4], tgt_c, kReductionMean, kIgnoreIndex, 0.0);
  // An undefined grad_loss means 1: the gradients of the mean loss itself.
  auto [grad_h, grad_w2, grad_b2] = linear_cross_entropy_backward_launch(
      at::Tensor(), h, p[3], p[4], tgt_c, lse, kReductionMean, kIgnoreIndex, 0.0);
  auto [grad_table, grad_w1, grad_b1] =
      embed_linear_tanh_backward_launch(grad_h, h, idx_c, p[0], p[1]);
  return {mean_loss.to(p[0].scalar_type()),
          Params{grad_table.contiguous(), grad_w1.contiguous(), grad_b1.contiguous(),
                 grad_w2.contiguous(), grad_b2.contiguous()}};
}

// The mean over no rows is NaN (like F.cross_entropy); every gradient is 0.
at::Tensor empty_batch_loss(const at::Tensor& table) {
  return at::full({}, std::numeric_limits<double>::quiet_NaN(), table.options());
}

at::Tensor mlp_cross_entropy_cuda(const at::Tensor& idx, const at::Tensor& target,
                                  const at::Tensor& table, const at::Tensor& weight1,
                                  const at::Tensor& bias1, const at::Tensor& weight2,
                                  const at::Tensor& bias2) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(table.device());
  if (idx.size(0) == 0) {
    check_index_errors();
    return empty_batch_loss(table);
  }
  at::Tensor loss = mlp_loss_launch(index_tensor(idx), index_tensor(target),
                                    contiguous_params(table, weight1, bias1, weight2, bias2));
  check_index_errors();
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_cross_entropy_and_grads_cuda(const at::Tensor& idx, const at::Tensor& target,
                                 const at::Tensor& table, const at::Tensor& weight1,
                                 const at::Tensor& bias1, const at::Tensor& weight2,
                                 const at::Tensor& bias2) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(table.device());
  if (idx.size(0) == 0) {
    check_index_errors();
    return {empty_batch_loss(table), at::zeros_like(table), at::zeros_like(weight1),
            at::zeros_like(bias1),   at::zeros_like(weight2), at::zeros_like(bias2)};
  }
  auto [loss, g] = mlp_loss_and_grads_launch(
      index_tensor(idx), index_tensor(target),
      contiguous_params(table, weight1, bias1, weight2, bias2));
  check_index_errors();
  return {loss, g[0], g[1], g[2], g[3], g[4]};
}

// The logits [B, V] = h W2^T + b2 and the mean loss on them (the parameters' dtype),
// with lse [B] for a backward. idx_c, tgt_c: contiguous int64; B > 0.
struct LogitsAndLoss {
  at::Tensor h, logits, loss, lse;
};

LogitsAndLoss mlp_logits_launch(const at::Tensor& idx_c, const at::Tensor& tgt_c,
                                const Params& p) {
  at::Tensor h = embed_linear_tanh_launch(idx_c, p[0], p[1], p[2]);  // B x H
  at::Tensor logits = at::addmm(p[4], h, p[3].t());                  // B x V
  auto [mean_loss, lse] =
      cross_entropy_launch(logits, tgt_c, kReductionMean, kIgnoreIndex, 0.0);
  return {h, logits, mean_loss.to(p[0].scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> mlp_logits_cross_entropy_cuda(
    const at::Tensor& idx, const at::Tensor& target, const at::Tensor& table,
    const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(table.device());
  if (idx.size(0) == 0) {
    check_index_errors();
    return {at::empty({0, table.size(0)}, table.options()), empty_batch_loss(table)};
  }
  const LogitsAndLoss out = mlp_logits_launch(
      index_tensor(idx), index_tensor(target), contiguous_params(table, weight1, bias1, weight2, bias2));
  check_index_errors();
  return {out.logits, out.loss};
}

// The same and the loss's five gradients: dlogits G [B, V] by the cross-entropy backward
// (grad_loss undefined: 1), then dW2 = G^T h, db2 = sum_b G, dh = G W2 and the first
// layer's fused backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_logits_cross_entropy_and_grads_cuda(const at::Tensor& idx, const at::Tensor& target,
                                        const at::Tensor& table, const at::Tensor& weight1,
                                        const at::Tensor& bias1, const at::Tensor& weight2,
                                        const at::Tensor& bias2) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(table.device());
  if (idx.size(0) == 0) {
    check_index_errors();
    return {at::empty({0, table.size(0)}, table.options()), empty_batch_loss(table),
            at::zeros_like(table), at::zeros_like(weight1), at::zeros_like(bias1),
            at::zeros_like(weight2), at::zeros_like(bias2)};
  }
  const at::Tensor idx_c = index_tensor(idx), tgt_c = index_tensor(target);
  const Params p = contiguous_params(table, weight1, bias1, weight2, bias2);
  const LogitsAndLoss out = mlp_logits_launch(idx_c, tgt_c, p);
  const at::Tensor G = cross_entropy_backward_launch(at::Tensor(), out.logits, tgt_c, out.lse,
                                                     kReductionMean, kIgnoreIndex, 0.0);
  const at::Tensor grad_w2 = G.t().mm(out.h), grad_b2 = G.sum(0), grad_h = G.mm(p[3]);
  auto [grad_table, grad_w1, grad_b1] =
      embed_linear_tanh_backward_launch(grad_h, out.h, idx_c, p[0], p[1]);
  check_index_errors();
  return {out.logits, out.loss, grad_table.contiguous(), grad_w1.contiguous(),
          grad_b1.contiguous(), grad_w2, grad_b2};
}

// One plain-SGD step of the contiguous parameters `work` on idx_c [B, T], tgt_c [B]
// (contiguous int64, B > 0). Returns the pre-update loss (0-d, the parameters' dtype),
// written into loss_out when that is defined (mlp_sgd_steps: its slot of the [K]
// result). Launches only: index errors are reported by the caller.
at::Tensor sgd_step_launch(const at::Tensor& idx_c, const at::Tensor& tgt_c, const Params& work,
                           double lr, at::Tensor loss_out = at::Tensor()) {
  const at::Tensor& table = work[0];
  const int64_t B = idx_c.size(0), T = idx_c.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = work[1].size(0);
  const size_t acc_size = at::toOpMathType(table.scalar_type()) == at::kDouble ? 8 : 4;
  const cudaStream_t stream = current_stream();
  if (sgd_step_fused_ok(B, T, V, E, H, acc_size)) {
    if (!loss_out.defined()) loss_out = at::empty({}, table.options());
    CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "mlp_sgd_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_sgd_step_fused<scalar_t, acc_t>(
          idx_c.const_data_ptr<int64_t>(), tgt_c.const_data_ptr<int64_t>(),
          work[0].mutable_data_ptr<scalar_t>(), work[1].mutable_data_ptr<scalar_t>(),
          work[2].mutable_data_ptr<scalar_t>(), work[3].mutable_data_ptr<scalar_t>(),
          work[4].mutable_data_ptr<scalar_t>(), static_cast<acc_t>(lr), B, T, V, E, H,
          loss_out.mutable_data_ptr<scalar_t>(), index_error_record(), stream);
    });
    return loss_out;
  }
  // General path: the per-layer kernels, then one multi-tensor SGD update that the
  // device skips if any index was bad.
  auto [mean_loss, grads] = mlp_loss_and_grads_launch(idx_c, tgt_c, work);
  if (loss_out.defined()) loss_out.copy_(mean_loss);
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
  return loss_out.defined() ? loss_out : mean_loss;
}

// Copies the updated contiguous parameters back where the caller's were not contiguous.
void copy_back(const Params& work, const std::array<at::Tensor*, 5>& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (!work[i].is_same(*params[i])) params[i]->copy_(work[i]);
  }
}

at::Tensor mlp_sgd_step_cuda(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                             at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                             at::Tensor& bias2, double lr) {
  check_mlp_sgd_step_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  const c10::cuda::CUDAGuard guard(table.device());
  if (idx.size(0) == 0) {
    check_index_errors();
    return empty_batch_loss(table);
  }
  // Work on contiguous parameters; copy back only if the caller's were not.
  const Params work = contiguous_params(table, weight1, bias1, weight2, bias2);
  // The loss has the parameters' dtype, like the CPU op and the fake kernel (ops.py).
  const at::Tensor loss = sgd_step_launch(index_tensor(idx), index_tensor(target), work, lr);
  copy_back(work, {&table, &weight1, &bias1, &weight2, &bias2});
  check_index_errors();
  return loss;
}

at::Tensor mlp_sgd_steps_cuda(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                              at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                              at::Tensor& bias2, c10::ArrayRef<double> lr) {
  check_mlp_sgd_steps_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t K = idx.size(0), B = idx.size(1), T = idx.size(2), V = table.size(0);
  if (K == 0 || B == 0) {  // K NaN losses (the mean over no rows), no update
    check_index_errors();
    return at::full({K}, std::numeric_limits<double>::quiet_NaN(), table.options());
  }
  const Params work = contiguous_params(table, weight1, bias1, weight2, bias2);
  const at::Tensor idx_c = index_tensor(idx).view({K * B, T});
  const at::Tensor tgt_c = index_tensor(target).view({K * B});
  // Every index of every step first: a bad one anywhere is recorded (at its flat position
  // in the whole tensor, like on CPU; with several bad values which one is reported may
  // differ) before the first step, and a recorded error makes every step skip its update
  // (both paths), so the call raises with no parameter touched. (A host-side failure
  // mid-loop, say out of memory at step k, leaves steps 0..k-1 applied.)
  const cudaStream_t stream = current_stream();
  launch_check_index_range(idx_c.const_data_ptr<int64_t>(), K * B * T, V, kArgIdx,
                           /*ignore_index=*/-1, index_error_record(), stream);
  launch_check_index_range(tgt_c.const_data_ptr<int64_t>(), K * B, V, kArgTarget, kIgnoreIndex,
                           index_error_record(), stream);
  at::Tensor losses = at::empty({K}, table.options());
  for (int64_t k = 0; k < K; ++k) {
    sgd_step_launch(idx_c.narrow(0, k * B, B), tgt_c.narrow(0, k * B, B), work, lr[k],
                    losses.select(0, k));
  }
  copy_back(work, {&table, &weight1, &bias1, &weight2, &bias2});
  check_index_errors();
  return losses;
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CUDA, m) {
  m.impl("mlp_cross_entropy", &mlp_cross_entropy_cuda);
  m.impl("mlp_cross_entropy_and_grads", &mlp_cross_entropy_and_grads_cuda);
  m.impl("mlp_logits_cross_entropy", &mlp_logits_cross_entropy_cuda);
  m.impl("mlp_logits_cross_entropy_and_grads", &mlp_logits_cross_entropy_and_grads_cuda);
  m.impl("mlp_sgd_step", &mlp_sgd_step_cuda);
  m.impl("mlp_sgd_steps", &mlp_sgd_steps_cuda);
}

}  // namespace cuda
}  // namespace charmlp
