// Autocast for the drop-in layer ops (DispatchKey::AutocastCPU / AutocastCUDA): under
// torch.autocast each op does what autocast does to the PyTorch code it replaces.
//
//   embed_linear_tanh     tanh(F.linear(F.embedding(idx, table), W, b)): F.linear runs in the
//                         autocast dtype, tanh keeps it; so table, weight and bias are cast
//                         to that dtype and the output is in it.
//   cross_entropy         F.cross_entropy is on autocast's float32 list: logits are cast to
//                         float32; the loss is float32.
//   linear_cross_entropy  F.cross_entropy(F.linear(h, W, b)): the linear in the autocast
//                         dtype, the loss in float32. Input, weight and bias are rounded to
//                         the autocast dtype; the loss comes out in float32. On CPU the
//                         kernels accumulate from float32 copies of their operands whatever
//                         the dtype, so the rounded operands go in as float32 and the loss,
//                         lse and gradients stay float32 (no rounding of the logits to the
//                         low dtype, which the composition does: slightly more accurate). On
//                         CUDA the operands stay in the low dtype, so the GEMMs run on
//                         tensor cores, and the loss is cast to float32.
// float64 tensors are left alone, as autocast leaves them. The whole-model ops have no
// autocast kernel: under autocast they run in their parameters' dtype.
//
// Each kernel excludes its autocast key, casts (cached_cast: the cast autocast itself
// uses, differentiable and cached for leaf weights within an autocast region), and calls
// the op again, which then reaches the Autograd kernel of csrc/autograd.cpp.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_handles.h"

namespace charmlp {
namespace {

using at::autocast::cached_cast;

template <c10::DeviceType kDevice>
struct AutocastRegion {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice)};
  const at::ScalarType low = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
};

template <c10::DeviceType kDevice>
at::Tensor embed_linear_tanh_autocast(const at::Tensor& idx, const at::Tensor& table,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  AutocastRegion<kDevice> region;
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&)>(
      "charmlp::embed_linear_tanh");
  return op.call(idx, cached_cast(region.low, table, kDevice),
                 cached_cast(region.low, weight, kDevice), cached_cast(region.low, bias, kDevice));
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> cross_entropy_autocast(
    const at::Tensor& logits, const at::Tensor& target, int64_t reduction, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& weight) {
  AutocastRegion<kDevice> region;
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
      const std::optional<at::Tensor>&)>("charmlp::cross_entropy");
  return op.call(cached_cast(at::kFloat, logits, kDevice), target, reduction, ignore_index,
                 label_smoothing, cached_cast(at::kFloat, weight, kDevice));
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  AutocastRegion<kDevice> region;
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      int64_t, int64_t, double, const std::optional<at::Tensor>&)>("charmlp::linear_cross_entropy");
  auto operand = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    std::optional<at::Tensor> low = cached_cast(region.low, t, kDevice);
    if constexpr (kDevice == c10::DeviceType::CPU) {
      // Back to float32 only what autocast rounded (float64 stays float64).
      if (low && t && low->scalar_type() != t->scalar_type()) return low->to(at::kFloat);
    }
    return low;
  };
  auto [loss, lse] = op.call(*operand(input), *operand(weight), operand(bias), target, reduction,
                             ignore_index, label_smoothing, class_weight);
  if (loss.scalar_type() != at::kDouble) loss = loss.to(at::kFloat);
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, AutocastCPU, m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_autocast<c10::DeviceType::CPU>);
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::CPU>);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(charmlp, AutocastCUDA, m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_autocast<c10::DeviceType::CUDA>);
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autocast<c10::DeviceType::CUDA>);
}

}  // namespace charmlp
