// Typed dispatcher handles of charmlp ops, for C++ code that calls other charmlp ops
// through the dispatcher (the autograd registrations):
// the call then reaches the CPU or CUDA kernel, or the fake kernel under torch.compile.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace charmlp {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// -> loss, grad_table, grad_weight1, grad_bias1, grad_weight2, grad_bias2
using MlpCrossEntropyAndGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&);
inline c10::TypedOperatorHandle<MlpCrossEntropyAndGrads>& mlp_cross_entropy_and_grads_op() {
  static auto op = op_handle<MlpCrossEntropyAndGrads>("charmlp::mlp_cross_entropy_and_grads");
  return op;
}

}  // namespace charmlp
