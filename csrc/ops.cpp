// The charmlp operator library: every schema in one place.
//
// Where each dispatch key's implementations are registered:
//   CPU          csrc/cpu/cpu_dispatch.cpp: one entry per op, which calls the kernels
//                compiled for the CPU's instruction set (csrc/cpu/<op>_cpu.cpp, built
//                once per capability; see csrc/cpu/capability.h)
//   CUDA         csrc/cuda/<op>_cuda.cpp: host wrappers that launch the kernels in
//                csrc/cuda/<op>_kernels.cu
//   Autograd     csrc/autograd.cpp (C++ autograd nodes: no Python on the backward path)
//   Autocast     csrc/autocast.cpp
// The fake kernels for torch.compile (register_fake) are next to the Python entry
// points in python/charmlp/ops.py.
//
// Shapes:  B batch rows, T context length, V vocabulary, E embedding width,
//          H hidden width.
#include <torch/library.h>

TORCH_LIBRARY(charmlp, m) {
  // tanh(concat_j table[idx[:, j]] @ weight^T + bias) without materializing the concat.
  // idx [B, T] int64/int32, table [V, E], weight [H, T*E], bias [H] -> out [B, H]
  m.def("embed_linear_tanh(Tensor idx, Tensor table, Tensor weight, Tensor? bias) -> Tensor");
  // Gradients of embed_linear_tanh from its output (tanh' = 1 - out^2), in one pass.
  // -> grad_table [V, E], grad_weight [H, T*E], grad_bias [H]
  m.def(
      "embed_linear_tanh_backward(Tensor grad_out, Tensor out, Tensor idx, Tensor table, "
      "Tensor weight) -> (Tensor, Tensor, Tensor)");

  // Softmax cross-entropy with class-index targets (F.cross_entropy semantics).
  // logits [B, V], target [B] -> loss ([] or [B] for reduction none), lse [B] (float32/64).
  // reduction: 0 none, 1 mean, 2 sum (ATen's at::Reduction codes). weight: class weights
  // [V] (F.cross_entropy's weight=, its weighted mean); csrc/class_weight.h has the math.
  // In the linear_cross_entropy ops the class weights are class_weight (weight is the
  // projection).
  m.def(
      "cross_entropy(Tensor logits, Tensor target, int reduction, int ignore_index, "
      "float label_smoothing, Tensor? weight=None) -> (Tensor, Tensor)");
  // One pass: grad_logits = scale * (exp(logits - lse) - (1 - eps) * onehot - eps / V).
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
      "int reduction, int ignore_index, float label_smoothing, Tensor? weight=None) -> Tensor");

  // The same loss (reduction mean or sum) and its gradient in one pass: what the autograd
  // forward calls when a gradient is needed. -> loss [], lse [B], grad_logits [B, V]
  m.def(
      "cross_entropy_and_grads(Tensor logits, Tensor target, int reduction, int ignore_index, "
      "float label_smoothing, Tensor? weight=None) -> (Tensor, Tensor, Tensor)");

  // Output projection fused with the loss: never stores logits or softmax for backward.
  // input [B, H], weight [V, H] (nn.Linear layout), bias [V], target [B]
  //   -> loss ([] or [B]), lse [B] (float32/64)
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int reduction, int ignore_index, float label_smoothing, Tensor? class_weight=None) -> "
      "(Tensor, Tensor)");
  // Recomputes the logits block by block from input and lse.
  // -> grad_input [B, H], grad_weight [V, H], grad_bias [V]
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor lse, int reduction, int ignore_index, "
      "float label_smoothing, Tensor? class_weight=None) -> (Tensor, Tensor, Tensor)");

  // The same loss (reduction mean or sum) and its gradients in one pass: what the
  // autograd forward calls when a gradient is needed (its backward then only scales).
  // -> loss [], lse [B], grad_input [B, H], grad_weight [V, H], grad_bias [V]
  m.def(
      "linear_cross_entropy_and_grads(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int reduction, int ignore_index, float label_smoothing, Tensor? class_weight=None) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");

  // The whole model's mean cross-entropy (rows with target -100 ignored), fused:
  // idx [B, T], target [B], table [V, E], weight1 [H, T*E], bias1 [H],
  // weight2 [V, H], bias2 [V] -> loss [] (the parameters' dtype).
  // Differentiable: its autograd forward calls mlp_cross_entropy_and_grads.
  m.def(
      "mlp_cross_entropy(Tensor idx, Tensor target, Tensor table, Tensor weight1, "
      "Tensor bias1, Tensor weight2, Tensor bias2) -> Tensor");
  // The same loss and its gradients with respect to the five parameters, in one pass.
  // -> loss [], grad_table [V, E], grad_weight1 [H, T*E], grad_bias1 [H],
  //    grad_weight2 [V, H], grad_bias2 [V]
  m.def(
      "mlp_cross_entropy_and_grads(Tensor idx, Tensor target, Tensor table, Tensor weight1, "
      "Tensor bias1, Tensor weight2, Tensor bias2) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");

  // The model's forward with targets: the logits [B, V] and the same mean loss, in one
  // pass. Differentiable: its autograd forward calls mlp_logits_cross_entropy_and_grads,
  // and its backward adds what a gradient of the logits contributes.
  // -> logits [B, V], loss []
  m.def(
      "mlp_logits_cross_entropy(Tensor idx, Tensor target, Tensor table, Tensor weight1, "
      "Tensor bias1, Tensor weight2, Tensor bias2) -> (Tensor, Tensor)");
  // -> logits, loss, grad_table, grad_weight1, grad_bias1, grad_weight2, grad_bias2
  m.def(
      "mlp_logits_cross_entropy_and_grads(Tensor idx, Tensor target, Tensor table, "
      "Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");

  // One plain-SGD training step of the whole model (mean cross-entropy), fused:
  // forward, backward and p -= lr * grad for all five parameters in place.
  // idx [B, T], target [B], table [V, E], weight1 [H, T*E], bias1 [H],
  // weight2 [V, H], bias2 [V] -> loss [] (before the update; float32/64)
  m.def(
      "mlp_sgd_step(Tensor idx, Tensor target, Tensor(a!) table, Tensor(b!) weight1, "
      "Tensor(c!) bias1, Tensor(d!) weight2, Tensor(e!) bias2, float lr) -> Tensor");
  // K such steps in one call (a training loop's inner loop without a Python round
  // trip per step): step k is exactly mlp_sgd_step(idx[k], target[k], ..., lr[k]).
  // Every index of every step is checked before the first: a bad one anywhere raises
  // with no parameter touched.
  // idx [K, B, T], target [K, B], lr K floats -> losses [K] (each before its update)
  m.def(
      "mlp_sgd_steps(Tensor idx, Tensor target, Tensor(a!) table, Tensor(b!) weight1, "
      "Tensor(c!) bias1, Tensor(d!) weight2, Tensor(e!) bias2, float[] lr) -> Tensor");
}
