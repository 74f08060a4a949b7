// Host side of the CUDA cross_entropy ops: checks, allocation and registration.
// Kernels and math: cross_entropy_kernels.cu.
#include <torch/library.h>

#include "class_weight.h"
#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"
#include "kernel_impl.h"

namespace charmlp {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> cross_entropy_launch(const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        int64_t reduction, int64_t ignore_index,
                                                        double label_smoothing) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  const at::Tensor x = logits.contiguous(), tgt = index_tensor(target);
  at::Tensor lse = at::empty({B}, logits.options().dtype(acc_dtype));
  at::Tensor loss = reduction == kReductionNone ? at::empty({B}, logits.options())
                                                : at::empty({}, logits.options());
  const int blocks = ce_forward_blocks(B);
  at::Tensor psum, pcount;
  if (blocks > 1 && reduction != kReductionNone) {
    psum = at::empty({blocks}, lse.options());
    pcount = at::empty({blocks}, logits.options().dtype(at::kLong));
  }
  CHARMLP_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool none = reduction == kReductionNone;
    launch_ce_forward<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), tgt.const_data_ptr<int64_t>(), B, V, ignore_index,
        static_cast<acc_t>(label_smoothing), reduction, lse.mutable_data_ptr<acc_t>(),
        none ? loss.mutable_data_ptr<scalar_t>() : nullptr,
        psum.defined() ? psum.mutable_data_ptr<acc_t>() : nullptr,
        pcount.defined() ? as_ll(pcount.mutable_data_ptr<int64_t>()) : nullptr,
        none ? nullptr : loss.mutable_data_ptr<scalar_t>(), blocks, index_error_record(),
        current_stream());
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward_launch(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const at::Tensor& lse,
                                         int64_t reduction, int64_t ignore_index,
                                         double label_smoothing) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  check_saved_lse(lse, logits, "logits");
  if (grad_loss.defined()) {  // undefined: internal callers meaning d(loss) = 1
    check_grad_loss(grad_loss, reduction, B);
    check_same_device(logits, "logits", grad_loss, "grad_loss");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({B, V}, logits.options());
  if (B == 0 || V == 0) return grad;
  const at::Tensor x = logits.contiguous(), tgt = index_tensor(target), l = lse.contiguous();
  const at::Tensor g = grad_loss.defined() ? grad_loss.to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor count;
  if (needs_count_buffer(reduction, B, ce_backward_blocks(B, V))) {
    count = at::empty({}, logits.options().dtype(at::kLong));
  }
  CHARMLP_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_ce_backward<scalar_t, acc_t>(
        g.defined() ? g.const_data_ptr<acc_t>() : nullptr, reduction, x.const_data_ptr<scalar_t>(),
        tgt.const_data_ptr<int64_t>(), l.const_data_ptr<acc_t>(), B, V, ignore_index,
        static_cast<acc_t>(label_smoothing), grad.mutable_data_ptr<scalar_t>(),
        count.defined() ? as_ll(count.mutable_data_ptr<int64_t>()) : nullptr, index_error_record(),
        current_stream());
  });
  return grad;
}

namespace {

// Class weights (class_weight.h): the kernels run unsmoothed with per-row scales, as
// reduction 'none', and the weighted reduction is ATen's.
ClassWeight class_weight_for(const at::Tensor& weight, const at::Tensor& logits,
                             const at::Tensor& target, int64_t ignore_index,
                             double label_smoothing) {
  check_cross_entropy_args(logits, target, kReductionNone, label_smoothing);
  check_class_weight(weight, logits.size(1), logits, "logits");
  return ClassWeight(weight, index_tensor(target), ignore_index, label_smoothing,
                     at::toOpMathType(logits.scalar_type()));
}

at::Tensor weighted_loss(const ClassWeight& cw, const at::Tensor& logits, const at::Tensor& L0,
                         const at::Tensor& lse, int64_t reduction) {
  const at::Tensor xw =
      cw.eps() != 0.0 ? logits.to(cw.weight().scalar_type()).mv(cw.weight()) : at::Tensor();
  return cw.reduce(cw.row_losses(L0, lse, xw), reduction, logits.scalar_type());
}

at::Tensor weighted_grad(const ClassWeight& cw, const at::Tensor& grad_loss,
                         const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& lse, int64_t reduction, int64_t ignore_index) {
  const at::Tensor base = cw.base_scales(grad_loss, reduction);
  at::Tensor grad = cross_entropy_backward_launch(cw.kernel_scales(base), logits, target, lse,
                                                  kReductionNone, ignore_index, 0.0);
  cw.add_smoothing_to_grad_logits(grad, base);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& logits,
                                                      const at::Tensor& target, int64_t reduction,
                                                      int64_t ignore_index, double label_smoothing,
                                                      const std::optional<at::Tensor>& weight) {
  if (use_naive_kernels()) {
    return cross_entropy_naive_cuda(logits, target, reduction, ignore_index, label_smoothing,
                                    weight);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  if (weight) {
    const ClassWeight cw = class_weight_for(*weight, logits, target, ignore_index, label_smoothing);
    auto [L0, lse] = cross_entropy_launch(logits, target, kReductionNone, ignore_index, 0.0);
    check_index_errors();
    return {weighted_loss(cw, logits, L0, lse, reduction), lse};
  }
  auto result = cross_entropy_launch(logits, target, reduction, ignore_index, label_smoothing);
  check_index_errors();
  return result;
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& lse,
                                       int64_t reduction, int64_t ignore_index,
                                       double label_smoothing,
                                       const std::optional<at::Tensor>& weight) {
  if (use_naive_kernels()) {
    return cross_entropy_backward_naive_cuda(grad_loss, logits, target, lse, reduction,
                                             ignore_index, label_smoothing, weight);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad;
  if (weight) {
    check_reduction(reduction);
    check_grad_loss(grad_loss, reduction, logits.size(0));
    check_same_device(logits, "logits", grad_loss, "grad_loss");
    const ClassWeight cw = class_weight_for(*weight, logits, target, ignore_index, label_smoothing);
    grad = weighted_grad(cw, grad_loss, logits, target, lse, reduction, ignore_index);
  } else {
    grad = cross_entropy_backward_launch(grad_loss, logits, target, lse, reduction, ignore_index,
                                         label_smoothing);
  }
  check_index_errors();
  return grad;
}

// The forward and backward kernels back to back (grad_loss of 1), so autograd takes
// the same path on both devices.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_cuda(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  if (use_naive_kernels()) {
    return cross_entropy_and_grads_naive_cuda(logits, target, reduction, ignore_index,
                                              label_smoothing, weight);
  }
  check_scalar_loss_reduction(reduction, "cross_entropy_and_grads");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (weight) {
    const ClassWeight cw = class_weight_for(*weight, logits, target, ignore_index, label_smoothing);
    auto [L0, lse] = cross_entropy_launch(logits, target, kReductionNone, ignore_index, 0.0);
    at::Tensor grad =
        weighted_grad(cw, at::Tensor(), logits, target, lse, reduction, ignore_index);
    check_index_errors();
    return {weighted_loss(cw, logits, L0, lse, reduction), lse, grad};
  }
  auto [loss, lse] =
      cross_entropy_launch(logits, target, reduction, ignore_index, label_smoothing);
  at::Tensor grad = cross_entropy_backward_launch(at::Tensor(), logits, target, lse, reduction,
                                                  ignore_index, label_smoothing);
  check_index_errors();
  return {loss, lse, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CUDA, m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
  m.impl("cross_entropy_and_grads", &cross_entropy_and_grads_cuda);
}

}  // namespace cuda
}  // namespace charmlp
