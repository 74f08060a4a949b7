// mlp_adamw_steps: K AdamW training steps of the whole model in one call, for any
// backend that has mlp_cross_entropy_and_grads (CPU, CUDA).
//
// Step k is exactly what a training loop of
//     loss = model.forward_backward(idx[k], target[k])   # mlp_cross_entropy_and_grads
//     opt.step()                                          # AdamW(fused=True), lr = lr[k]
// computes: the fused loss-and-gradients op, then the two ATen calls a fused
// torch.optim.AdamW makes (state_steps += 1, then _fused_adamw_) on the optimizer's
// own state tensors. Same kernels, same order, so the result is bitwise that loop's
// (wherever the gradient op is itself reproducible), and the optimizer's state_dict
// stays torch.optim.AdamW's. What the op saves is the loop's Python: at the lecture's
// batch of 32 on CPU, setting the lr, the forward_backward wrapper, .grad hand-over and
// AdamW.step()'s bookkeeping cost more than the kernels.
//
// A composite of other ops (registered for CompositeExplicitAutograd), not a kernel:
// its speed is theirs. Every index of every step is checked first, so a bad one raises
// with no parameter or optimizer state changed (on CUDA one synchronization per call).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "op_handles.h"

namespace charmlp {
namespace {

constexpr int64_t kIgnoreIndex = -100;

// The lowest flat position of a value outside [0, bound) (other than `allowed`)
// raises IndexError with every charmlp op's message.
void check_index_range(const at::Tensor& t, int64_t bound, const char* name,
                       std::optional<int64_t> allowed) {
  const at::Tensor flat = t.reshape(-1);
  at::Tensor bad = flat.lt(0).logical_or_(flat.ge(bound));
  if (allowed) bad.logical_and_(flat.ne(*allowed));
  if (!bad.any().item<bool>()) return;
  const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
  throw_index_out_of_range(name, flat[pos].item<int64_t>(), bound, pos);
}

// g laid out like the parameter p, as AccumulateGrad lays out a .grad: the kernels'
// gradients are contiguous, while _fused_adamw_ walks param, grad and state (which
// AdamW allocates with the parameter's strides) as flat arrays in one order.
at::Tensor laid_out_like(const at::Tensor& g, const at::Tensor& p) {
  if (g.strides() == p.strides()) return g;
  if (!p.is_non_overlapping_and_dense()) return g.contiguous();
  return at::empty_strided(p.sizes(), p.strides(), g.options()).copy_(g);
}

at::Tensor mlp_adamw_steps(const at::Tensor& idx, const at::Tensor& target,
                           at::TensorList params, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList state_steps,
                           c10::ArrayRef<double> lr, double beta1, double beta2,
                           double weight_decay, double eps) {
  check_mlp_adamw_steps_args(idx, target, params, exp_avgs, exp_avg_sqs, state_steps, lr, beta1,
                             beta2, weight_decay, eps);
  const int64_t K = idx.size(0), V = params[0].size(0);
  check_index_range(idx, V, "idx", std::nullopt);
  check_index_range(target, V, "target", kIgnoreIndex);
  std::vector<at::Tensor> losses;
  losses.reserve(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    auto [loss, g0, g1, g2, g3, g4] = mlp_cross_entropy_and_grads_op().call(
        idx[k], target[k], params[0], params[1], params[2], params[3], params[4]);
    losses.push_back(loss);
    at::_foreach_add_(state_steps, 1);
    const std::vector<at::Tensor> grads = {
        laid_out_like(g0, params[0]), laid_out_like(g1, params[1]), laid_out_like(g2, params[2]),
        laid_out_like(g3, params[3]), laid_out_like(g4, params[4])};
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, {}, state_steps, lr[k],
                      beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  }
  return K > 0 ? at::stack(losses) : at::empty({0}, params[0].options());
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CompositeExplicitAutograd, m) {
  m.impl("mlp_adamw_steps", &mlp_adamw_steps);
}

}  // namespace charmlp
