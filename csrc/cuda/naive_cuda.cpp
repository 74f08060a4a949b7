// Host side of the kernel tour's naive CUDA kernels (kernel_impl.h): the fast ops' argument
// checks, allocation, the launches and the index-error check. Kernels and math:
// embed_linear_tanh_naive.cu and cross_entropy_naive.cu. The registered CUDA kernels
// (embed_linear_tanh_cuda.cpp, cross_entropy_cuda.cpp) branch here under
// charmlp.set_kernel_impl("naive").
#include "class_weight.h"
#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"

namespace charmlp {
namespace cuda {

at::Tensor embed_linear_tanh_naive_cuda(const at::Tensor& idx, const at::Tensor& table,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias) {
  check_embed_linear_tanh_args(idx, table, weight, bias);  // as embed_linear_tanh_launch
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor idx_c = index_tensor(idx), table_c = table.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  at::Tensor out = at::empty({B, H}, table.options());
  CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "embed_linear_tanh_naive_cuda", [&] {
    launch_naive_embed_forward<scalar_t>(
        idx_c.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
        weight_c.const_data_ptr<scalar_t>(),
        bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), B, T, V, E, H, index_error_record(), current_stream());
  });
  check_index_errors();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_naive_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight) {
  check_embed_linear_tanh_backward_args(grad_out, out, idx, table, weight);
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous(), idx_c = index_tensor(idx);
  const at::Tensor table_c = table.contiguous(), weight_c = weight.contiguous();
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  at::Tensor grad_table = at::empty({V, E}, table.options());
  at::Tensor grad_weight = at::empty({H, T * E}, table.options());
  at::Tensor grad_bias = at::empty({H}, table.options());
  CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "embed_linear_tanh_backward_naive_cuda", [&] {
    launch_naive_embed_backward<scalar_t>(
        go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        idx_c.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
        weight_c.const_data_ptr<scalar_t>(), grad_table.mutable_data_ptr<scalar_t>(),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), B, T,
        V, E, H, index_error_record(), current_stream());
  });
  check_index_errors();
  return {grad_table, grad_weight, grad_bias};
}

namespace {

// What every naive cross-entropy op prepares after its checks: contiguous logits, int64
// targets, the class weights in the accumulation dtype (undefined without), and sums (2):
// the mean's denominator and sum_v w[v], computed on the device by one thread.
struct CrossEntropyInputs {
  at::Tensor x, target, w, sums;
};

CrossEntropyInputs prepare(const at::Tensor& logits, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight) {
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  CrossEntropyInputs in{logits.contiguous(), index_tensor(target),
                        weight ? weight->to(acc_dtype).contiguous() : at::Tensor(),
                        at::empty({2}, logits.options().dtype(acc_dtype))};
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "cross_entropy_naive_sums", [&] {
    launch_naive_ce_sums<scalar_t>(
        in.target.const_data_ptr<int64_t>(),
        in.w.defined() ? in.w.const_data_ptr<scalar_t>() : nullptr, logits.size(0),
        logits.size(1), ignore_index, in.sums.mutable_data_ptr<scalar_t>(), index_error_record(),
        current_stream());
  });
  return in;
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// -> loss, lse
std::tuple<at::Tensor, at::Tensor> naive_forward(const CrossEntropyInputs& in, int64_t reduction,
                                                 int64_t ignore_index, double label_smoothing) {
  const int64_t B = in.x.size(0), V = in.x.size(1);
  const auto acc_dtype = at::toOpMathType(in.x.scalar_type());
  at::Tensor lse = at::empty({B}, in.x.options().dtype(acc_dtype));
  at::Tensor row_loss = at::empty({B}, lse.options());
  at::Tensor loss = reduction == kReductionNone ? at::Tensor() : at::empty({}, in.x.options());
  CHARMLP_DISPATCH_FLOAT(in.x.scalar_type(), "cross_entropy_naive_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_naive_ce_forward<scalar_t, acc_t>(
        in.x.const_data_ptr<scalar_t>(), in.target.const_data_ptr<int64_t>(),
        ptr_or_null<acc_t>(in.w), B, V, ignore_index, static_cast<acc_t>(label_smoothing),
        reduction, in.sums.const_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
        row_loss.mutable_data_ptr<acc_t>(),
        loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr,
        index_error_record(), current_stream());
  });
  if (reduction == kReductionNone) loss = row_loss.to(in.x.scalar_type());
  return {loss, lse};
}

// grad_loss: acc dtype, or undefined meaning 1.
at::Tensor naive_backward(const CrossEntropyInputs& in, const at::Tensor& grad_loss,
                          const at::Tensor& lse, int64_t reduction, int64_t ignore_index,
                          double label_smoothing) {
  const int64_t B = in.x.size(0), V = in.x.size(1);
  at::Tensor grad = at::empty({B, V}, in.x.options());
  const at::Tensor l = lse.contiguous();
  CHARMLP_DISPATCH_FLOAT(in.x.scalar_type(), "cross_entropy_backward_naive_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_naive_ce_backward<scalar_t, acc_t>(
        ptr_or_null<acc_t>(grad_loss), reduction, in.x.const_data_ptr<scalar_t>(),
        in.target.const_data_ptr<int64_t>(), ptr_or_null<acc_t>(in.w), l.const_data_ptr<acc_t>(),
        in.sums.const_data_ptr<acc_t>(), B, V, ignore_index, static_cast<acc_t>(label_smoothing),
        grad.mutable_data_ptr<scalar_t>(), index_error_record(), current_stream());
  });
  return grad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_naive_cuda(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);  // as the fast op
  check_class_weight(weight, logits.size(1), logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyInputs in = prepare(logits, target, ignore_index, weight);
  auto result = naive_forward(in, reduction, ignore_index, label_smoothing);
  check_index_errors();
  return result;
}

at::Tensor cross_entropy_backward_naive_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                             const at::Tensor& target, const at::Tensor& lse,
                                             int64_t reduction, int64_t ignore_index,
                                             double label_smoothing,
                                             const std::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, reduction, label_smoothing);  // as the fast op
  check_saved_lse(lse, logits, "logits");
  check_grad_loss(grad_loss, reduction, logits.size(0));
  check_same_device(logits, "logits", grad_loss, "grad_loss");
  check_class_weight(weight, logits.size(1), logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyInputs in = prepare(logits, target, ignore_index, weight);
  const at::Tensor g = grad_loss.to(at::toOpMathType(logits.scalar_type())).contiguous();
  at::Tensor grad = naive_backward(in, g, lse, reduction, ignore_index, label_smoothing);
  check_index_errors();
  return grad;
}

// The forward, then the backward with grad_loss = 1, as the fast CUDA op.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_and_grads_naive_cuda(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  check_scalar_loss_reduction(reduction, "cross_entropy_and_grads");  // as the fast op
  check_cross_entropy_args(logits, target, reduction, label_smoothing);
  check_class_weight(weight, logits.size(1), logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyInputs in = prepare(logits, target, ignore_index, weight);
  auto [loss, lse] = naive_forward(in, reduction, ignore_index, label_smoothing);
  at::Tensor grad =
      naive_backward(in, at::Tensor(), lse, reduction, ignore_index, label_smoothing);
  check_index_errors();
  return {loss, lse, grad};
}

}  // namespace cuda
}  // namespace charmlp
