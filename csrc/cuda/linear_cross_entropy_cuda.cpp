// Host side of the CUDA linear_cross_entropy ops: path choice (fused small-vocabulary
// kernels vs cuBLAS logits + cross_entropy kernels), checks, allocation, registration.
// Kernels and math: linear_cross_entropy_kernels.cu.
#include <torch/library.h>

#include "class_weight.h"
#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"

namespace charmlp {
namespace cuda {

namespace {

// Generic path: logits by cuBLAS, in a temporary that lives only inside one call.
at::Tensor linear_logits(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
}

// Rows per block of the generic path: ~8 M logits (32 MB of float32), as on CPU
// (linear_cross_entropy_cpu.cpp), so that neither [B, V] logits nor their gradient exist
// whole for word-level vocabularies; one block (the unblocked code) whenever B fits.
int64_t generic_block_rows(int64_t B, int64_t V) {
  const int64_t rows = std::max<int64_t>(64, ((int64_t{1} << 23) / std::max<int64_t>(V, 1)) / 16 * 16);
  return std::min(rows, std::max<int64_t>(B, 1));
}

// d(reduced loss)/d(row loss) [B] in acc dtype, 0 on ignored rows: what each block's
// backward (reduction none) scales its rows by. grad_loss undefined means 1.
at::Tensor generic_row_scales(const at::Tensor& grad_loss, const at::Tensor& target,
                              int64_t reduction, int64_t ignore_index, at::ScalarType acc) {
  const at::Tensor counted = target.ne(ignore_index).to(acc);
  at::Tensor g = grad_loss.defined() ? grad_loss.to(acc).reshape({-1})
                                     : at::ones({1}, counted.options());
  if (reduction == kReductionMean) g = g / counted.sum().clamp_min(1);
  return g * counted;
}

// The generic forward in row blocks: logits_blk by cuBLAS, then the cross_entropy kernels
// on the block (reduction none); the reduction over blocks is ATen's.
std::tuple<at::Tensor, at::Tensor> blocked_generic_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const int64_t B = input.size(0), V = weight.size(0), Bc = generic_block_rows(B, V);
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor lse = at::empty({B}, input.options().dtype(acc));
  at::Tensor rows = at::empty({B}, input.options().dtype(acc));
  for (int64_t r0 = 0; r0 < B; r0 += Bc) {
    const int64_t n = std::min(Bc, B - r0);
    auto [loss_blk, lse_blk] =
        cross_entropy_launch(linear_logits(input.narrow(0, r0, n), weight, bias),
                             target.narrow(0, r0, n), kReductionNone, ignore_index, label_smoothing);
    lse.narrow(0, r0, n).copy_(lse_blk);
    rows.narrow(0, r0, n).copy_(loss_blk);
  }
  if (reduction == kReductionNone) return {rows.to(input.scalar_type()), lse};
  at::Tensor total = rows.sum();
  if (reduction == kReductionMean) total = total / target.ne(ignore_index).sum();  // 0/0 = nan
  return {total.to(input.scalar_type()), lse};
}

// The generic backward in row blocks: logits_blk recomputed by cuBLAS, dlogits_blk by the
// cross_entropy backward kernel with per-row scales, then grad_input_blk = dz W,
// grad_weight += dz^T input_blk, grad_bias += colsum(dz) (the last two in acc dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> blocked_generic_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const int64_t B = input.size(0), V = weight.size(0), Bc = generic_block_rows(B, V);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor scales = generic_row_scales(grad_loss, target, reduction, ignore_index, acc);
  at::Tensor grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({V}, weight.options().dtype(acc));
  for (int64_t r0 = 0; r0 < B; r0 += Bc) {
    const int64_t n = std::min(Bc, B - r0);
    const at::Tensor x = input.narrow(0, r0, n);
    const at::Tensor dz = cross_entropy_backward_launch(
        scales.narrow(0, r0, n), linear_logits(x, weight, bias), target.narrow(0, r0, n),
        lse.narrow(0, r0, n), kReductionNone, ignore_index, label_smoothing);
    at::Tensor gi = grad_input.narrow(0, r0, n);
    at::mm_out(gi, dz, weight);
    grad_weight.add_(at::mm(dz.t(), x).to(acc));
    grad_bias.add_(at::sum(dz, {0}, false, acc));
  }
  const auto dt = input.scalar_type();
  return {grad_input, grad_weight.to(dt), grad_bias.to(dt)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_launch(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_linear_cross_entropy_args(input, weight, bias, target, reduction, label_smoothing);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), H = input.size(1), V = weight.size(0);
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  const size_t acc_size = acc_dtype == at::kDouble ? 8 : 4;
  if (!lce_fused_ok(V, H, acc_size, false)) {
    if (generic_block_rows(B, V) < B) {
      return blocked_generic_forward(input, weight, bias, target, reduction, ignore_index,
                                     label_smoothing);
    }
    return cross_entropy_launch(linear_logits(input, weight, bias), target, reduction,
                                ignore_index, label_smoothing);
  }
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), tgt = index_tensor(target);
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  at::Tensor lse = at::empty({B}, input.options().dtype(acc_dtype));
  at::Tensor loss = reduction == kReductionNone ? at::empty({B}, input.options())
                                                : at::empty({}, input.options());
  const int blocks = lce_blocks(B);
  at::Tensor psum, pcount;
  if (blocks > 1 && reduction != kReductionNone) {
    psum = at::empty({blocks}, lse.options());
    pcount = at::empty({blocks}, input.options().dtype(at::kLong));
  }
  CHARMLP_DISPATCH_FLOAT(input.scalar_type(), "linear_cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool none = reduction == kReductionNone;
    launch_lce_forward<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
        tgt.const_data_ptr<int64_t>(), B, H, V, ignore_index, static_cast<acc_t>(label_smoothing),
        reduction, lse.mutable_data_ptr<acc_t>(), none ? loss.mutable_data_ptr<scalar_t>() : nullptr,
        psum.defined() ? psum.mutable_data_ptr<acc_t>() : nullptr,
        pcount.defined() ? as_ll(pcount.mutable_data_ptr<int64_t>()) : nullptr,
        none ? nullptr : loss.mutable_data_ptr<scalar_t>(), blocks, index_error_record(),
        current_stream());
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_launch(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_linear_cross_entropy_args(input, weight, bias, target, reduction, label_smoothing);
  const int64_t B = input.size(0), H = input.size(1), V = weight.size(0);
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  check_saved_lse(lse, input, "input");
  if (grad_loss.defined()) {
    check_grad_loss(grad_loss, reduction, B);
    check_same_device(input, "input", grad_loss, "grad_loss");
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const size_t acc_size = acc_dtype == at::kDouble ? 8 : 4;

  if (B == 0) {
    return {at::zeros_like(input, at::MemoryFormat::Contiguous),
            at::zeros_like(weight, at::MemoryFormat::Contiguous), at::zeros({V}, weight.options())};
  }
  if (!lce_fused_ok(V, H, acc_size, true)) {
    if (generic_block_rows(B, V) < B) {
      return blocked_generic_backward(grad_loss, input, weight, bias, target, lse, reduction,
                                      ignore_index, label_smoothing);
    }
    // Generic: recompute logits with cuBLAS, one-pass softmax gradient, cuBLAS GEMMs.
    const at::Tensor logits = linear_logits(input, weight, bias);
    const at::Tensor dz = cross_entropy_backward_launch(grad_loss, logits, target, lse, reduction,
                                                        ignore_index, label_smoothing);
    at::Tensor grad_input = at::mm(dz, weight);
    at::Tensor grad_weight = at::mm(dz.t(), input);
    at::Tensor grad_bias = at::sum(dz, {0}, false, acc_dtype).to(input.scalar_type());
    return {grad_input, grad_weight, grad_bias};
  }

  const at::Tensor x = input.contiguous(), w = weight.contiguous(), tgt = index_tensor(target);
  const at::Tensor l = lse.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor g = grad_loss.defined() ? grad_loss.to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor grad_input = at::empty({B, H}, input.options());
  at::Tensor grad_weight = at::empty({V, H}, input.options());
  at::Tensor grad_bias = at::empty({V}, input.options());
  const int blocks = lce_blocks(B);
  at::Tensor pW, pb, count;
  if (blocks > 1) {
    pW = at::empty({blocks, V, H}, input.options().dtype(acc_dtype));
    pb = at::empty({blocks, V}, pW.options());
  }
  if (needs_count_buffer(reduction, B, blocks)) count = at::empty({}, input.options().dtype(at::kLong));
  CHARMLP_DISPATCH_FLOAT(input.scalar_type(), "linear_cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_lce_backward<scalar_t, acc_t>(
        g.defined() ? g.const_data_ptr<acc_t>() : nullptr, reduction, x.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
        tgt.const_data_ptr<int64_t>(), l.const_data_ptr<acc_t>(), B, H, V, ignore_index,
        static_cast<acc_t>(label_smoothing), grad_input.mutable_data_ptr<scalar_t>(),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
        pW.defined() ? pW.mutable_data_ptr<acc_t>() : nullptr,
        pb.defined() ? pb.mutable_data_ptr<acc_t>() : nullptr,
        count.defined() ? as_ll(count.mutable_data_ptr<int64_t>()) : nullptr, blocks,
        index_error_record(), current_stream());
  });
  return {grad_input, grad_weight, grad_bias};
}

namespace {

// Class weights (class_weight.h): the kernels run unsmoothed with per-row scales, as
// reduction 'none', and the weighted reduction is ATen's.
ClassWeight class_weight_for(const at::Tensor& class_weight, const at::Tensor& input,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& target, int64_t ignore_index,
                             double label_smoothing) {
  check_linear_cross_entropy_args(input, weight, bias, target, kReductionNone, label_smoothing);
  check_class_weight(class_weight, weight.size(0), input, "input");
  return ClassWeight(class_weight, index_tensor(target), ignore_index, label_smoothing,
                     at::toOpMathType(input.scalar_type()));
}

at::Tensor weighted_loss(const ClassWeight& cw, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& L0,
                         const at::Tensor& lse, int64_t reduction) {
  at::Tensor xw;
  if (cw.eps() != 0.0) {  // x_b . w = input_b . (W^T w) + bias . w, no logits
    const auto acc = cw.weight().scalar_type();
    xw = input.to(acc).mv(weight.to(acc).t().mv(cw.weight()));
    if (bias) xw = xw + bias->to(acc).dot(cw.weight());
  }
  return cw.reduce(cw.row_losses(L0, lse, xw), reduction, input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_grads(
    const ClassWeight& cw, const at::Tensor& grad_loss, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, int64_t reduction, int64_t ignore_index) {
  const at::Tensor base = cw.base_scales(grad_loss, reduction);
  auto [grad_input, grad_weight, grad_bias] = linear_cross_entropy_backward_launch(
      cw.kernel_scales(base), input, weight, bias, target, lse, kReductionNone, ignore_index, 0.0);
  cw.add_smoothing_to_linear_grads(base, input, weight, grad_input, grad_weight, grad_bias);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  const c10::cuda::CUDAGuard guard(input.device());
  if (class_weight) {
    const ClassWeight cw = class_weight_for(*class_weight, input, weight, bias, target,
                                            ignore_index, label_smoothing);
    auto [L0, lse] = linear_cross_entropy_launch(input, weight, bias, target, kReductionNone,
                                                 ignore_index, 0.0);
    check_index_errors();
    return {weighted_loss(cw, input, weight, bias, L0, lse, reduction), lse};
  }
  auto result = linear_cross_entropy_launch(input, weight, bias, target, reduction, ignore_index,
                                            label_smoothing);
  check_index_errors();
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  const c10::cuda::CUDAGuard guard(input.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  if (class_weight) {
    check_reduction(reduction);
    check_grad_loss(grad_loss, reduction, input.size(0));
    check_same_device(input, "input", grad_loss, "grad_loss");
    const ClassWeight cw = class_weight_for(*class_weight, input, weight, bias, target,
                                            ignore_index, label_smoothing);
    grads = weighted_grads(cw, grad_loss, input, weight, bias, target, lse, reduction,
                           ignore_index);
  } else {
    grads = linear_cross_entropy_backward_launch(grad_loss, input, weight, bias, target, lse,
                                                 reduction, ignore_index, label_smoothing);
  }
  check_index_errors();
  return grads;
}

// The forward and backward kernels back to back (grad_loss of 1): the CPU kernel's
// single pass is not replicated here, but the op is, so autograd takes the same
// path on both devices.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_and_grads_cuda(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& target, int64_t reduction,
                                    int64_t ignore_index, double label_smoothing,
                                    const std::optional<at::Tensor>& class_weight) {
  check_scalar_loss_reduction(reduction, "linear_cross_entropy_and_grads");
  const c10::cuda::CUDAGuard guard(input.device());
  if (class_weight) {
    const ClassWeight cw = class_weight_for(*class_weight, input, weight, bias, target,
                                            ignore_index, label_smoothing);
    auto [L0, lse] = linear_cross_entropy_launch(input, weight, bias, target, kReductionNone,
                                                 ignore_index, 0.0);
    auto [grad_input, grad_weight, grad_bias] = weighted_grads(
        cw, at::Tensor(), input, weight, bias, target, lse, reduction, ignore_index);
    check_index_errors();
    return {weighted_loss(cw, input, weight, bias, L0, lse, reduction), lse, grad_input,
            grad_weight, grad_bias};
  }
  auto [loss, lse] = linear_cross_entropy_launch(input, weight, bias, target, reduction,
                                                 ignore_index, label_smoothing);
  auto [grad_input, grad_weight, grad_bias] = linear_cross_entropy_backward_launch(
      at::Tensor(), input, weight, bias, target, lse, reduction, ignore_index, label_smoothing);
  check_index_errors();
  return {loss, lse, grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
  m.impl("linear_cross_entropy_and_grads", &linear_cross_entropy_and_grads_cuda);
}

}  // namespace cuda
}  // namespace charmlp
