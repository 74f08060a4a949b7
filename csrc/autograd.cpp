// Autograd for the charmlp ops, registered in C++ (DispatchKey::Autograd).
//
// Each differentiable op has a fused backward op (see ops.cpp); the functions
// here only save what that backward needs and call it. Doing this in C++
// instead of torch.library.register_autograd in Python saves the Python
// round trip of a custom autograd node, tens of microseconds per op per step,
// which at the lecture's batch of 32 is more than the kernels themselves.
// The registrations are device-agnostic: the forward and backward calls
// re-dispatch to the CPU or CUDA kernels, or to the fake kernels in
// python/charmlp/ops.py under torch.compile.
#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "op_handles.h"

namespace charmlp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The options every cross-entropy node keeps for its backward. The class weights are
// a constant of the loss (no gradient, as in F.cross_entropy), kept as an option.
struct LossOptions {
  int64_t reduction, ignore_index;
  double label_smoothing;
  std::optional<at::Tensor> weight;
};

void save_loss_options(AutogradContext* ctx, const LossOptions& o) {
  ctx->saved_data["reduction"] = o.reduction;
  ctx->saved_data["ignore_index"] = o.ignore_index;
  ctx->saved_data["label_smoothing"] = o.label_smoothing;
  ctx->saved_data["weight"] = o.weight;
}

LossOptions loss_options(AutogradContext* ctx) {
  return {ctx->saved_data["reduction"].toInt(), ctx->saved_data["ignore_index"].toInt(),
          ctx->saved_data["label_smoothing"].toDouble(),
          ctx->saved_data["weight"].toOptional<at::Tensor>()};
}

// F.cross_entropy has no derivative for its class weights; neither do these ops, and a
// weight that asks for one gets an error rather than a silent None.
void check_no_weight_grad(const char* op, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(weight && weight->requires_grad() && at::GradMode::is_enabled()), "charmlp: ", op,
      " has no gradient with respect to its class weights (like F.cross_entropy); pass "
      "weight.detach()");
}

// Forward-mode AD (torch.func.jvp/jacfwd, torch.autograd.forward_ad) would need a jvp
// rule per op, which the C++ custom-function API cannot register; without this check
// the tangents of the outputs would silently be missing (zeros under jacfwd).
void check_no_forward_ad(const char* op, std::initializer_list<at::Tensor> inputs) {
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !t.defined() || !t._fw_grad(/*level=*/0).defined(), "charmlp: ", op,
        " does not support forward-mode AD (jvp, jacfwd, forward_ad dual tensors); use plain "
        "PyTorch ops (F.embedding, F.linear, torch.tanh, F.cross_entropy) for forward-mode "
        "derivatives");
  }
}

// dloss/dlogits of a cross-entropy as differentiable ATen ops, for a backward that builds
// a graph (create_graph=True): the fused kernels' gradients are constants to autograd,
// so a double backward goes through this formula instead. grad_rows [B] is each row's
// gradient scale (grad_loss, divided by the count, or the targets' total class weight,
// for a mean); ignored rows get 0. With class weights w (1 without), r_b = w[t_b]:
//   dloss/dx[b, v] = grad_rows[b] * (a_b softmax(x[b])[v] - (1 - eps) r_b [v == t_b]
//                                    - (eps / V) w_v),   a_b = (1 - eps) r_b + (eps / V) sum w
at::Tensor differentiable_grad_logits(const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& grad_loss, const LossOptions& o) {
  const int64_t V = logits.size(1);
  const double eps = o.label_smoothing;
  const at::Tensor counted = target.ne(o.ignore_index);
  const at::Tensor safe_target = target.masked_fill(counted.logical_not(), 0).to(at::kLong);
  const at::Tensor hit = at::zeros_like(logits).scatter_(1, safe_target.unsqueeze(1), 1.0);
  at::Tensor grad_rows = grad_loss * counted.to(logits.scalar_type());
  at::Tensor p = at::softmax(logits, 1), target_dist;
  if (o.weight) {
    const at::Tensor w = o.weight->to(logits.scalar_type());
    const at::Tensor r = w.index_select(0, safe_target) * counted.to(logits.scalar_type());
    if (o.reduction == at::Reduction::Mean) {
      const at::Tensor total = r.sum();
      grad_rows = at::where(total != 0, grad_rows / total, at::zeros_like(grad_rows));
    }
    p = p * (r * (1.0 - eps) + w.sum() * (eps / V)).unsqueeze(1);
    target_dist = hit * (r * (1.0 - eps)).unsqueeze(1) + w * (eps / V);
  } else {
    if (o.reduction == at::Reduction::Mean) {
      grad_rows = grad_rows / std::max<int64_t>(counted.sum().item<int64_t>(), 1);
    }
    target_dist = hit * (1.0 - eps);
    if (eps != 0.0) target_dist = target_dist + eps / V;
  }
  return (p - target_dist) * grad_rows.unsqueeze(1);
}

// The gradients of linear_cross_entropy (logits = input @ weight^T + bias) from the
// formula above, differentiable: -> grad_input, grad_weight, grad_bias (undefined without bias).
std::vector<at::Tensor> differentiable_linear_cross_entropy_grads(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& grad_loss, const LossOptions& o) {
  const at::Tensor G = differentiable_grad_logits(at::linear(input, weight, bias), target,
                                                  grad_loss, o);  // [B, V]
  return {G.mm(weight), G.t().mm(input), bias ? G.sum(0) : at::Tensor()};
}

// The *_and_grads ops, called by the autograd forwards and, for a second backward, again.
using CrossEntropyAndGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
    const std::optional<at::Tensor>&);
c10::TypedOperatorHandle<CrossEntropyAndGrads>& cross_entropy_and_grads_op() {
  static auto op = op_handle<CrossEntropyAndGrads>("charmlp::cross_entropy_and_grads");
  return op;
}

using LinearCrossEntropyAndGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
        int64_t, int64_t, double, const std::optional<at::Tensor>&);
c10::TypedOperatorHandle<LinearCrossEntropyAndGrads>& linear_cross_entropy_and_grads_op() {
  static auto op = op_handle<LinearCrossEntropyAndGrads>("charmlp::linear_cross_entropy_and_grads");
  return op;
}

// embed_linear_tanh: saves idx, table, weight and the output (tanh' = 1 - out^2).
struct EmbedLinearTanhFunction : public torch::autograd::Function<EmbedLinearTanhFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& idx, const at::Tensor& table,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&)>(
        "charmlp::embed_linear_tanh");
    at::Tensor out = op.call(idx, table, weight, bias);
    ctx->save_for_backward({idx, table, weight, out});
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&)>("charmlp::embed_linear_tanh_backward");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      auto g = differentiable_backward(grads[0], saved[3], saved[0], saved[1], saved[2]);
      return {at::Tensor(), g[0], g[1], has_bias ? g[2] : at::Tensor()};
    }
    auto [grad_table, grad_weight, grad_bias] =
        op.call(grads[0], saved[3], saved[0], saved[1], saved[2]);
    return {at::Tensor(), grad_table, grad_weight, has_bias ? grad_bias : at::Tensor()};
  }

  // The backward as ATen ops, so that autograd can differentiate it (gradient penalties,
  // gradgradcheck). With g = grad_out * (1 - out^2) [B, H] and emb = table[idx] [B, T*E]:
  //   grad_bias = sum_b g,  grad_weight = g^T emb,  grad_table = index_add(idx, g weight).
  // out is this node's own saved output, so a gradient flowing into it comes back
  // through this node: the second derivative of tanh needs no rule of its own.
  static std::vector<at::Tensor> differentiable_backward(const at::Tensor& grad_out,
                                                         const at::Tensor& out,
                                                         const at::Tensor& idx,
                                                         const at::Tensor& table,
                                                         const at::Tensor& weight) {
    const int64_t B = idx.size(0), E = table.size(1);
    const at::Tensor flat_idx = idx.reshape(-1).to(at::kLong);
    const at::Tensor g = grad_out * (1 - out * out);                          // [B, H]
    const at::Tensor emb = table.index_select(0, flat_idx).view({B, -1});      // [B, T*E]
    const at::Tensor grad_emb = g.mm(weight).view({-1, E});                    // [B*T, E]
    return {at::zeros_like(table).index_add(0, flat_idx, grad_emb), g.t().mm(emb), g.sum(0)};
  }
};

// Whether t is a plain CPU tensor holding 1: what loss.backward() seeds a scalar loss
// with. Its value may only be read from a plain CPU tensor: under torch.compile (fake
// or functional tensors), functorch transforms (wrapper tensors) or on CUDA (a device
// sync) the caller multiplies instead.
bool is_plain_cpu_one(const at::Tensor& t) {
  static const c10::DispatchKeySet plain_cpu({c10::DispatchKey::CPU,
                                              c10::DispatchKey::ADInplaceOrView,
                                              c10::DispatchKey::AutogradCPU,
                                              c10::DispatchKey::AutocastCPU});
  return t.defined() && plain_cpu.isSupersetOf(t.key_set()) && t.layout() == c10::kStrided &&
         t.numel() == 1 && t.item<double>() == 1.0;
}

// For the ops whose autograd forward computes the gradients of a scalar loss: the
// forward stashes them in the node; the backward applies the chain rule,
// dL/dp = grad_loss * g_p. The first backward takes the stashed tensors over (no copy)
// and scales them in place, or not at all when grad_loss is 1 (what loss.backward()
// seeds): for linear_cross_entropy that spares a pass over grad_input [B, H]. So the
// tensors it returns alias nothing autograd keeps. A second backward through a retained
// graph finds them taken and recomputes them from the inputs saved by the forward
// (whose version counters catch in-place changes since the forward, as for any saved
// input). The gradients are constants to autograd, so a backward that builds a graph
// (create_graph=True) cannot use them: the cross-entropy ops then differentiate a
// formula of ATen ops instead, and mlp_cross_entropy raises.
void stash_gradients(AutogradContext* ctx, std::vector<at::Tensor> grads) {
  ctx->saved_data["grads"] = c10::List<at::Tensor>(std::move(grads));
}

template <typename Recompute>
std::vector<at::Tensor> take_scaled_gradients(AutogradContext* ctx, const at::Tensor& grad_loss,
                                              const char* op, const char* alternative,
                                              Recompute recompute) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "charmlp: ", op,
              " computes its gradients in the forward and does not support double backward "
              "(create_graph=True); use ", alternative, " for higher-order gradients");
  std::vector<at::Tensor> grads;
  const auto stashed = ctx->saved_data.find("grads");
  if (stashed != ctx->saved_data.end()) {
    grads = stashed->second.toTensorVector();
    ctx->saved_data.erase(stashed);
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    grads = recompute(ctx->get_saved_variables());
  }
  if (!is_plain_cpu_one(grad_loss)) at::_foreach_mul_(grads, grad_loss);
  return grads;
}

// cross_entropy: saves logits, target and the per-row log-sum-exp (never the softmax).
using CrossEntropyOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           int64_t, int64_t, double,
                                                           const std::optional<at::Tensor>&);

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, int64_t reduction, int64_t ignore_index,
                               double label_smoothing, const std::optional<at::Tensor>& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<CrossEntropyOp>("charmlp::cross_entropy");
    auto [loss, lse] = op.call(logits, target, reduction, ignore_index, label_smoothing, weight);
    ctx->save_for_backward({logits, target, lse});
    save_loss_options(ctx, {reduction, ignore_index, label_smoothing, weight});
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, int64_t, double,
                             const std::optional<at::Tensor>&)>("charmlp::cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    const LossOptions o = loss_options(ctx);
    at::Tensor grad_logits =
        at::GradMode::is_enabled()  // create_graph=True
            ? differentiable_grad_logits(saved[0], saved[1], grads[0], o)
            : op.call(grads[0], saved[0], saved[1], saved[2], o.reduction, o.ignore_index,
                      o.label_smoothing, o.weight);
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// cross_entropy with a scalar loss (mean or sum) when a gradient is needed: the
// forward is cross_entropy_and_grads (one exp per logit for lse, loss and gradient)
// and stashes grad_logits [B, V] (the same size as the logits the two-pass form keeps);
// the backward hands it over, scaled by grad_loss.
struct CrossEntropyGradsInForwardFunction
    : public torch::autograd::Function<CrossEntropyGradsInForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, int64_t reduction, int64_t ignore_index,
                               double label_smoothing, const std::optional<at::Tensor>& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, grad_logits] = cross_entropy_and_grads_op().call(
        logits, target, reduction, ignore_index, label_smoothing, weight);
    stash_gradients(ctx, {grad_logits});
    ctx->save_for_backward({logits, target});  // for a second backward only
    save_loss_options(ctx, {reduction, ignore_index, label_smoothing, weight});
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) {  // create_graph=True: the stashed gradient is a constant
      ctx->saved_data.erase("grads");
      const auto saved = ctx->get_saved_variables();
      return {differentiable_grad_logits(saved[0], saved[1], grads[0], loss_options(ctx)),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto g = take_scaled_gradients(
        ctx, grads[0], "cross_entropy (mean or sum)", "F.cross_entropy",
        [ctx](const variable_list& in) -> std::vector<at::Tensor> {
          const LossOptions o = loss_options(ctx);
          return {std::get<2>(cross_entropy_and_grads_op().call(
              in[0], in[1], o.reduction, o.ignore_index, o.label_smoothing, o.weight))};
        });
    return {g[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using LinearCrossEntropyOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    int64_t, int64_t, double, const std::optional<at::Tensor>&);

// linear_cross_entropy: saves input, weight, bias, target and lse; the backward
// recomputes the logits chunk by chunk.
struct LinearCrossEntropyFunction
    : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& target, int64_t reduction, int64_t ignore_index,
                               double label_smoothing,
                               const std::optional<at::Tensor>& class_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<LinearCrossEntropyOp>("charmlp::linear_cross_entropy");
    auto [loss, lse] = op.call(input, weight, bias, target, reduction, ignore_index,
                               label_smoothing, class_weight);
    ctx->save_for_backward({input, weight, bias.value_or(at::Tensor()), target, lse});
    ctx->saved_data["has_bias"] = bias.has_value();
    save_loss_options(ctx, {reduction, ignore_index, label_smoothing, class_weight});
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
        const std::optional<at::Tensor>&)>("charmlp::linear_cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::optional<at::Tensor> bias =
        has_bias ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const LossOptions o = loss_options(ctx);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      auto g = differentiable_linear_cross_entropy_grads(saved[0], saved[1], bias, saved[3],
                                                         grads[0], o);
      return {g[0],         g[1],         g[2],         at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [grad_input, grad_weight, grad_bias] =
        op.call(grads[0], saved[0], saved[1], bias, saved[3], saved[4], o.reduction,
                o.ignore_index, o.label_smoothing, o.weight);
    return {grad_input,   grad_weight,  has_bias ? grad_bias : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// linear_cross_entropy with a scalar loss (mean or sum) when a gradient is needed:
// the forward is linear_cross_entropy_and_grads (one pass, three GEMMs) and stashes
// grad_input, grad_weight and grad_bias; the backward hands them over, scaled. Against the
// two-pass form this saves the backward's recompute of the logits (a GEMM) and an
// exp pass; it keeps grad_input [B, H] from the forward on, memory the two-pass
// backward allocates anyway when it runs (the loss is normally the graph's last op).
struct LinearCrossEntropyGradsInForwardFunction
    : public torch::autograd::Function<LinearCrossEntropyGradsInForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& target, int64_t reduction, int64_t ignore_index,
                               double label_smoothing,
                               const std::optional<at::Tensor>& class_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, grad_input, grad_weight, grad_bias] = linear_cross_entropy_and_grads_op().call(
        input, weight, bias, target, reduction, ignore_index, label_smoothing, class_weight);
    stash_gradients(ctx, {grad_input, grad_weight, grad_bias});
    ctx->save_for_backward({input, weight, bias.value_or(at::Tensor()), target});
    ctx->saved_data["has_bias"] = bias.has_value();
    save_loss_options(ctx, {reduction, ignore_index, label_smoothing, class_weight});
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True: the stashed gradients are constants
      ctx->saved_data.erase("grads");
      const auto in = ctx->get_saved_variables();
      auto g = differentiable_linear_cross_entropy_grads(
          in[0], in[1], has_bias ? std::optional<at::Tensor>(in[2]) : std::nullopt, in[3],
          grads[0], loss_options(ctx));
      return {g[0],         g[1],         g[2],         at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto g = take_scaled_gradients(
        ctx, grads[0], "linear_cross_entropy (mean or sum)", "F.linear and F.cross_entropy",
        [ctx, has_bias](const variable_list& in) -> std::vector<at::Tensor> {
          const LossOptions o = loss_options(ctx);
          auto out = linear_cross_entropy_and_grads_op().call(
              in[0], in[1], has_bias ? std::optional<at::Tensor>(in[2]) : std::nullopt, in[3],
              o.reduction, o.ignore_index, o.label_smoothing, o.weight);
          return {std::get<2>(out), std::get<3>(out), std::get<4>(out)};
        });
    return {g[0],         g[1],         has_bias ? g[2] : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(),         at::Tensor()};
  }
};

// The whole-model ops' five gradients from their saved inputs (idx, target, table, W1, b1,
// W2, b2), for a second backward through a retained graph.
std::vector<at::Tensor> recompute_mlp_grads(const variable_list& in) {
  auto [loss, g0, g1, g2, g3, g4] =
      mlp_cross_entropy_and_grads_op().call(in[0], in[1], in[2], in[3], in[4], in[5], in[6]);
  return {g0, g1, g2, g3, g4};
}

// mlp_cross_entropy: the forward computes the loss and all five parameter gradients
// in one pass (mlp_cross_entropy_and_grads) and stashes the gradients; the backward
// hands them over, scaled by grad_loss. The saved gradients are parameter-sized, smaller than
// the [B, H] activations a two-pass backward would keep.
struct MlpCrossEntropyFunction : public torch::autograd::Function<MlpCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& idx, const at::Tensor& target,
                            const at::Tensor& table, const at::Tensor& weight1,
                            const at::Tensor& bias1, const at::Tensor& weight2,
                            const at::Tensor& bias2) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, g_table, g_w1, g_b1, g_w2, g_b2] =
        mlp_cross_entropy_and_grads_op().call(idx, target, table, weight1, bias1, weight2, bias2);
    stash_gradients(ctx, {g_table, g_w1, g_b1, g_w2, g_b2});
    ctx->save_for_backward({idx, target, table, weight1, bias1, weight2, bias2});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = take_scaled_gradients(
        ctx, grads[0], "mlp_cross_entropy", "plain PyTorch ops (MLPLanguageModel(fused=False))",
        recompute_mlp_grads);
    return {at::Tensor(), at::Tensor(), g[0], g[1], g[2], g[3], g[4]};
  }
};

// mlp_logits_cross_entropy: the model's forward with targets, (logits, loss). As
// mlp_cross_entropy, the forward computes the loss's five gradients and stashes them. The
// logits are an output too: when the caller's graph sends them a gradient G [B, V] (an
// extra loss term, distillation, logit regularization), the backward adds what G
// contributes, through the output layer and then the first layer:
//   dW2 += G^T h,  db2 += sum_b G,  dh = G W2,  (dtable, dW1, db1) += embed_linear_tanh'
// with h recomputed by embed_linear_tanh (saving h [B, H] would cost every step memory
// and a write for a case most steps never see). With no gradient into the logits
// (materialize_grads off: grads[0] is undefined) it is the plain hand-over.
struct MlpLogitsCrossEntropyFunction
    : public torch::autograd::Function<MlpLogitsCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& idx,
                               const at::Tensor& target, const at::Tensor& table,
                               const at::Tensor& weight1, const at::Tensor& bias1,
                               const at::Tensor& weight2, const at::Tensor& bias2) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                          at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "charmlp::mlp_logits_cross_entropy_and_grads");
    auto [logits, loss, g_table, g_w1, g_b1, g_w2, g_b2] =
        op.call(idx, target, table, weight1, bias1, weight2, bias2);
    stash_gradients(ctx, {g_table, g_w1, g_b1, g_w2, g_b2});
    ctx->save_for_backward({idx, target, table, weight1, bias1, weight2, bias2});
    ctx->set_materialize_grads(false);
    return {logits, loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_logits = grads[0];
    const at::Tensor& grad_loss = grads[1];
    std::vector<at::Tensor> g;
    if (grad_loss.defined()) {
      g = take_scaled_gradients(
          ctx, grad_loss, "the model's forward (mlp_logits_cross_entropy)",
          "plain PyTorch ops (MLPLanguageModel(fused=False))",
          recompute_mlp_grads);
    } else {
      TORCH_CHECK(!at::GradMode::is_enabled(), "charmlp: the model's forward "
                  "(mlp_logits_cross_entropy) does not support double backward "
                  "(create_graph=True); use plain PyTorch ops (MLPLanguageModel(fused=False))");
      ctx->saved_data.erase("grads");
    }
    if (grad_logits.defined()) {
      add_logits_gradient(grad_logits, ctx->get_saved_variables(), g);
    }
    if (g.empty()) return variable_list(7);
    return {at::Tensor(), at::Tensor(), g[0], g[1], g[2], g[3], g[4]};
  }

  // g (the five gradients, or empty) += what grad_logits [B, V] contributes.
  static void add_logits_gradient(const at::Tensor& grad_logits, const variable_list& in,
                                  std::vector<at::Tensor>& g) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto forward = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&)>(
        "charmlp::embed_linear_tanh");
    static auto backward =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&)>("charmlp::embed_linear_tanh_backward");
    const at::Tensor &idx = in[0], &table = in[2], &weight1 = in[3], &bias1 = in[4],
                     &weight2 = in[5];
    const at::Tensor G = grad_logits.to(weight2.scalar_type());
    const at::Tensor h = forward.call(idx, table, weight1, bias1);     // [B, H]
    const at::Tensor dW2 = G.t().mm(h), db2 = G.sum(0), dh = G.mm(weight2);
    auto [dtable, dW1, db1] = backward.call(dh, h, idx, table, weight1);
    if (g.empty()) {
      g = {dtable, dW1, db1, dW2, db2};
      return;
    }
    const std::array<at::Tensor, 5> extra = {dtable, dW1, db1, dW2, db2};
    for (size_t i = 0; i < extra.size(); ++i) g[i].add_(extra[i]);
  }
};

at::Tensor embed_linear_tanh_autograd(const at::Tensor& idx, const at::Tensor& table,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  check_no_forward_ad("embed_linear_tanh", {table, weight, bias.value_or(at::Tensor())});
  return EmbedLinearTanhFunction::apply(idx, table, weight, bias);
}

// As linear_cross_entropy_autograd: no gradient, the forward kernel; a scalar loss,
// the gradient in the forward; reduction 'none', the two-pass form.
std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& logits,
                                                          const at::Tensor& target,
                                                          int64_t reduction, int64_t ignore_index,
                                                          double label_smoothing,
                                                          const std::optional<at::Tensor>& weight) {
  check_no_forward_ad("cross_entropy", {logits});
  check_no_weight_grad("cross_entropy", weight);
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<CrossEntropyOp>("charmlp::cross_entropy");
    return op.call(logits, target, reduction, ignore_index, label_smoothing, weight);
  }
  auto out = reduction == at::Reduction::None
                 ? CrossEntropyFunction::apply(logits, target, reduction, ignore_index,
                                               label_smoothing, weight)
                 : CrossEntropyGradsInForwardFunction::apply(logits, target, reduction,
                                                             ignore_index, label_smoothing, weight);
  return {out[0], out[1]};
}

// Without a gradient to compute, the forward kernel alone; with one, gradients in
// the forward for a scalar loss, the two-pass form for reduction 'none' (whose row
// scales arrive only with the backward).
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  check_no_forward_ad("linear_cross_entropy", {input, weight, bias.value_or(at::Tensor())});
  check_no_weight_grad("linear_cross_entropy", class_weight);
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (input.requires_grad() || weight.requires_grad() || (bias && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<LinearCrossEntropyOp>("charmlp::linear_cross_entropy");
    return op.call(input, weight, bias, target, reduction, ignore_index, label_smoothing,
                   class_weight);
  }
  auto out = reduction == at::Reduction::None
                 ? LinearCrossEntropyFunction::apply(input, weight, bias, target, reduction,
                                                     ignore_index, label_smoothing, class_weight)
                 : LinearCrossEntropyGradsInForwardFunction::apply(input, weight, bias, target,
                                                                   reduction, ignore_index,
                                                                   label_smoothing, class_weight);
  return {out[0], out[1]};
}

// Whether autograd must record: grad mode on and a parameter that requires grad.
bool needs_any_grad(std::initializer_list<at::Tensor> params) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& p : params) {
    if (p.requires_grad()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> mlp_logits_cross_entropy_autograd(
    const at::Tensor& idx, const at::Tensor& target, const at::Tensor& table,
    const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2) {
  check_no_forward_ad("mlp_logits_cross_entropy", {table, weight1, bias1, weight2, bias2});
  const bool needs_grad = needs_any_grad({table, weight1, bias1, weight2, bias2});
  if (needs_grad) {
    auto out =
        MlpLogitsCrossEntropyFunction::apply(idx, target, table, weight1, bias1, weight2, bias2);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&)>("charmlp::mlp_logits_cross_entropy");
  return op.call(idx, target, table, weight1, bias1, weight2, bias2);
}

// Without a gradient to compute (no_grad, or no parameter requiring grad) the
// loss-only kernel runs: no gradient work, nothing saved.
at::Tensor mlp_cross_entropy_autograd(const at::Tensor& idx, const at::Tensor& target,
                                      const at::Tensor& table, const at::Tensor& weight1,
                                      const at::Tensor& bias1, const at::Tensor& weight2,
                                      const at::Tensor& bias2) {
  check_no_forward_ad("mlp_cross_entropy", {table, weight1, bias1, weight2, bias2});
  const bool needs_grad = needs_any_grad({table, weight1, bias1, weight2, bias2});
  if (needs_grad) {
    return MlpCrossEntropyFunction::apply(idx, target, table, weight1, bias1, weight2, bias2);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&)>("charmlp::mlp_cross_entropy");
  return op.call(idx, target, table, weight1, bias1, weight2, bias2);
}

// The training-step ops update the parameters in place, which autograd cannot record:
// like PyTorch's in-place ops on a leaf that requires grad, they refuse to run while
// grad mode is on (model.sgd_step and charmlp train call them under no_grad). Then they
// bump the parameters' version counters, as any in-place op does, so a graph that saved
// a parameter before the step raises at its backward instead of using the new values.
using StepParams = std::array<at::Tensor, 5>;  // table, weight1, bias1, weight2, bias2

template <typename Step>
at::Tensor update_in_place(const char* op, const StepParams& params, Step step) {
  static constexpr const char* kNames[] = {"table", "weight1", "bias1", "weight2", "bias2"};
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(!(at::GradMode::is_enabled() && params[i].requires_grad()), "charmlp: ", op,
                " updates ", kNames[i], " in place, but it requires grad and grad mode is on; "
                "call it under torch.no_grad()");
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = step();
  }
  for (const at::Tensor& p : params) torch::autograd::impl::bump_version(p);
  return out;
}

at::Tensor mlp_sgd_step_autograd(const at::Tensor& idx, const at::Tensor& target,
                                 at::Tensor& table, at::Tensor& weight1, at::Tensor& bias1,
                                 at::Tensor& weight2, at::Tensor& bias2, double lr) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                        at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                        double)>("charmlp::mlp_sgd_step");
  return update_in_place("mlp_sgd_step", {table, weight1, bias1, weight2, bias2}, [&] {
    return op.call(idx, target, table, weight1, bias1, weight2, bias2, lr);
  });
}

at::Tensor mlp_sgd_steps_autograd(const at::Tensor& idx, const at::Tensor& target,
                                  at::Tensor& table, at::Tensor& weight1, at::Tensor& bias1,
                                  at::Tensor& weight2, at::Tensor& bias2,
                                  c10::ArrayRef<double> lr) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                        at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                        c10::ArrayRef<double>)>("charmlp::mlp_sgd_steps");
  return update_in_place("mlp_sgd_steps", {table, weight1, bias1, weight2, bias2}, [&] {
    return op.call(idx, target, table, weight1, bias1, weight2, bias2, lr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, Autograd, m) {
  m.impl("mlp_sgd_step", &mlp_sgd_step_autograd);
  m.impl("mlp_sgd_steps", &mlp_sgd_steps_autograd);
  m.impl("mlp_cross_entropy", &mlp_cross_entropy_autograd);
  m.impl("mlp_logits_cross_entropy", &mlp_logits_cross_entropy_autograd);
  m.impl("embed_linear_tanh", &embed_linear_tanh_autograd);
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
}

}  // namespace charmlp
