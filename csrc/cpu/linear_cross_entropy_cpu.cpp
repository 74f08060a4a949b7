// CPU kernels of linear_cross_entropy: cross_entropy(input @ weight^T + bias, target).
//
// Forward: for each chunk of rows, logits = input @ W^T + b in a cache-resident
// scratch buffer, then lse and the row losses; only lse [B] is kept.
// Backward: recompute the chunk's logits (one small GEMM, cheaper than storing
// and re-reading [B, V] from memory), turn them into dlogits with the saved
// lse, then dW += dlogits^T @ input, db += colsum, grad_input = dlogits @ W.
// The weight gradients are accumulated per thread and summed in thread order
// (deterministic); grad_input rows are disjoint per thread.
//
// Gradients in the forward (linear_cross_entropy_and_grads, mean/sum reductions):
// the gradient scale of every row is known before the forward (1/count or 1), so
// one pass does logits, lse, the loss and dlogits (one exp per logit), then the
// backward GEMMs: three GEMMs instead of four, no recompute. Autograd
// (csrc/autograd.cpp) uses it whenever a gradient is needed and the loss is a
// scalar; reduction 'none' keeps the recompute backward (its scales come later).
//
// Speed limit: GEMMs of 2*B*H*V flops (logits, dW, grad_input; a fourth, the
// recompute, in the two-pass backward); the row softmax is a few percent at V = 27.
// Small heads run them through small_gemm.h inside the chunk loop; large ones (word
// vocabularies) through ATen's GEMMs on row blocks (output_gemm.h says which and why).
//
// Blocked path (large V * H): rows in blocks of Bc, with Bc * V ~ 8 M logits (32 MB of
// float32), so the [B, V] logits and their gradient never exist whole: peak extra memory
// is one block, next to grad_weight [V, H], which any backward allocates.
//   logits_blk = input_blk @ W^T + b     at::addmm_out into the block buffer [Bc, Vp]
//   lse, loss, dlogits per row           softmax_xent_row.h, rows in parallel
//   dW += dlogits_blk^T input_blk        at::addmm_ into grad_weight
//   db += colsum(dlogits_blk),  grad_input_blk = dlogits_blk @ W   (at::mm_out)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "class_weight.h"
#include "cpu/cross_entropy_cpu.h"
#include "cpu/index_check.h"
#include "cpu/kernels.h"
#include "cpu/output_gemm.h"
#include "cpu/output_layer.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

namespace {

struct Inputs {
  at::Tensor input, weight, bias, target;  // acc dtype, contiguous; bias undefined if absent
};

Inputs prepare(const at::Tensor& input, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& target,
               int64_t ignore_index) {
  const auto acc = at::toOpMathType(input.scalar_type());
  Inputs in;
  in.input = input.to(acc).contiguous();
  in.weight = weight.to(acc).contiguous();
  if (bias) in.bias = bias->to(acc).contiguous();
  in.target = checked_indices_cpu(target, weight.size(0), "target", ignore_index);
  return in;
}

template <typename T>
void forward_impl(const Inputs& in, int64_t ignore_index, T eps, T* lse, T* loss) {
  const int64_t B = in.input.size(0), H = in.input.size(1), V = in.weight.size(0);
  const T* x = in.input.const_data_ptr<T>();
  const std::vector<T> Wt = transpose_copy(in.weight.const_data_ptr<T>(), V, H, padded_cols<T>(V));
  const T* b = in.bias.defined() ? in.bias.const_data_ptr<T>() : nullptr;
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  at::parallel_for(0, B, kOutputChunkRows, [&](int64_t b0, int64_t b1) {
    T* logits = thread_scratch<T>(Scratch::kChunkC, kOutputChunkRows * padded_cols<T>(V));
    for (int64_t c0 = b0; c0 < b1; c0 += kOutputChunkRows) {
      const int64_t n = std::min(kOutputChunkRows, b1 - c0);
      output_logits<T>(n, H, V, x + c0 * H, Wt.data(), b, logits);
      output_loss_rows<T>(n, V, logits, tgt + c0, ignore_index, eps, lse + c0, loss + c0);
    }
  });
}

// grad_input, grad_weight, grad_bias from per-row gradient scales. kWithForward:
// the chunk's lse and row losses are computed in the same exp pass (written to lse
// and loss); otherwise lse is the forward's (read) and loss is unused.
template <typename T, bool kWithForward>
void gradient_impl(const Inputs& in, std::conditional_t<kWithForward, T*, const T*> lse, T* loss,
                   const T* scale, int64_t ignore_index, T eps, T* grad_input, T* grad_weight,
                   T* grad_bias) {
  const int64_t B = in.input.size(0), H = in.input.size(1), V = in.weight.size(0);
  const T* x = in.input.const_data_ptr<T>();
  const T* W = in.weight.const_data_ptr<T>();
  const std::vector<T> Wt = transpose_copy(W, V, H, padded_cols<T>(V));
  const T* b = in.bias.defined() ? in.bias.const_data_ptr<T>() : nullptr;
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  // One slot per thread: dW [V, H] then db [V].
  ThreadPartials<T> partials(V * H + V);
  at::parallel_for(0, B, kOutputChunkRows, [&](int64_t b0, int64_t b1) {
    T* dW = partials.slot();
    T* db = dW + V * H;
    T* logits = thread_scratch<T>(Scratch::kChunkC, kOutputChunkRows * padded_cols<T>(V));
    for (int64_t c0 = b0; c0 < b1; c0 += kOutputChunkRows) {
      const int64_t n = std::min(kOutputChunkRows, b1 - c0);
      output_logits<T>(n, H, V, x + c0 * H, Wt.data(), b, logits);
      if constexpr (kWithForward) {
        output_loss_and_dlogits<T>(n, V, logits, tgt + c0, ignore_index, eps, scale + c0,
                                   lse + c0, loss + c0);
      } else {
        output_dlogits<T>(n, V, logits, tgt + c0, ignore_index, eps, lse + c0, scale + c0);
      }
      output_backward<T>(n, H, V, logits, x + c0 * H, W, dW, db, grad_input + c0 * H);
    }
  });
  std::vector<T> work(static_cast<size_t>(V * H + V));
  const T* sum = partials.reduce(work.data());
  std::copy_n(sum, V * H, grad_weight);
  std::copy_n(sum + V * H, V, grad_bias);
}

// Rows per block of the blocked path: ~8 M logits (32 MB of float32), a multiple of the
// row kernels' 16. Each block re-reads and re-writes grad_weight [V, H] in its dW GEMM, so
// blocks must be tall: at V = 32,000, H = 512, blocks of 64 rows made that traffic (16
// passes over 62.5 MB) the whole cost, 1.5x slower than PyTorch's one [B, V] GEMM; blocks
// of 256 rows pass over it 4 times at B = 1,024.
// And at most 8 blocks: at V = 50,257, H = 1,024 (grad_weight 206 MB) 160-row blocks made 26
// passes over it, 0.97x PyTorch at B = 4,096; B / 8 rows keep the block at an eighth of the
// [B, V] logits (the composition holds those and their gradient: 1/16 of its memory).
int64_t block_rows(int64_t B, int64_t V) {
  const int64_t rows = std::max<int64_t>(
      {64, (int64_t{1} << 23) / std::max<int64_t>(V, 1), (B + 7) / 8});
  return std::min((rows + 15) / 16 * 16, std::max<int64_t>(B, 1));
}

// The blocked path. Mode kForward: lse and loss. kGradWithForward: lse, loss and the
// gradients (scale known up front). kGradFromLse: the gradients from the forward's lse.
enum class BlockedMode { kForward, kGradWithForward, kGradFromLse };

template <typename T, BlockedMode kMode>
void blocked_impl(const Inputs& in,
                  std::conditional_t<kMode == BlockedMode::kGradFromLse, const T*, T*> lse,
                  T* loss, const T* scale, int64_t ignore_index,
                  T eps, at::Tensor grad_input, at::Tensor grad_weight, at::Tensor grad_bias) {
  constexpr bool kGrad = kMode != BlockedMode::kForward;
  const int64_t B = in.input.size(0), V = in.weight.size(0), Vp = padded_cols<T>(V);
  const int64_t Bc = block_rows(B, V);
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  at::Tensor buffer = at::empty({Bc, Vp}, in.input.options());
  if constexpr (kGrad) {
    if (B == 0) {
      grad_weight.zero_();
      grad_bias.zero_();
    }
  }
  const at::Tensor Wt = in.weight.t();
  for (int64_t r0 = 0; r0 < B; r0 += Bc) {
    const int64_t n = std::min(Bc, B - r0);
    const at::Tensor x = in.input.narrow(0, r0, n);
    at::Tensor logits = buffer.narrow(0, 0, n).narrow(1, 0, V);  // [n, V], row stride Vp
    if (in.bias.defined()) {
      at::addmm_out(logits, in.bias, x, Wt);
    } else {
      at::mm_out(logits, x, Wt);
    }
    T* L = buffer.mutable_data_ptr<T>();
    // Rows are independent: blocks of the row kernels' lane count, in parallel.
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      const int64_t r = r0 + a;
      if constexpr (kMode == BlockedMode::kForward) {
        output_loss_rows<T>(b - a, V, L + a * Vp, tgt + r, ignore_index, eps, lse + r, loss + r);
      } else if constexpr (kMode == BlockedMode::kGradWithForward) {
        output_loss_and_dlogits<T>(b - a, V, L + a * Vp, tgt + r, ignore_index, eps, scale + r,
                                   lse + r, loss + r);
      } else {
        output_dlogits<T>(b - a, V, L + a * Vp, tgt + r, ignore_index, eps, lse + r, scale + r);
      }
    });
    if constexpr (kGrad) {
      const at::Tensor& dlogits = logits;
      if (r0 == 0) {  // the first block writes (no pass over grad_weight to zero it first)
        at::mm_out(grad_weight, dlogits.t(), x);
        at::sum_out(grad_bias, dlogits, 0);
      } else {
        grad_weight.addmm_(dlogits.t(), x);
        grad_bias.add_(dlogits.sum(0));
      }
      at::Tensor gi = grad_input.narrow(0, r0, n);
      at::mm_out(gi, dlogits, in.weight);
    }
  }
}

// x_b . w of the logits x = input @ weight^T + bias and class weights w, [B]: two
// matrix-vector products, no logits (what class_weight.h needs with label smoothing).
at::Tensor logits_dot_class_weight(const Inputs& in, const ClassWeight& cw) {
  if (cw.eps() == 0.0) return at::Tensor();
  at::Tensor xw = in.input.mv(in.weight.t().mv(cw.weight()));
  if (in.bias.defined()) xw.add_(in.bias.dot(cw.weight()));
  return xw;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  check_linear_cross_entropy_args(input, weight, bias, target, reduction, label_smoothing);
  check_class_weight(class_weight, weight.size(0), input, "input");
  const Inputs in = prepare(input, weight, bias, target, ignore_index);
  const int64_t B = input.size(0);
  const auto cw = make_class_weight(class_weight, in.target, ignore_index, label_smoothing,
                                    in.input.scalar_type());
  const double label_eps = cw ? 0.0 : label_smoothing;  // class_weight.h: kernels unsmoothed
  at::Tensor lse = at::empty({B}, in.input.options());
  at::Tensor row_loss = at::empty({B}, in.input.options());
  const bool aten = use_aten_gemm(B, weight.size(0), input.size(1));
  AT_DISPATCH_FLOATING_TYPES(in.input.scalar_type(), "linear_cross_entropy_cpu", [&] {
    const auto eps = static_cast<scalar_t>(label_eps);
    scalar_t* l = lse.mutable_data_ptr<scalar_t>();
    scalar_t* rl = row_loss.mutable_data_ptr<scalar_t>();
    if (aten) {
      blocked_impl<scalar_t, BlockedMode::kForward>(in, l, rl, nullptr, ignore_index, eps, {}, {}, {});
    } else {
      forward_impl<scalar_t>(in, ignore_index, eps, l, rl);
    }
  });
  if (cw) {
    const at::Tensor rows = cw->row_losses(row_loss, lse, logits_dot_class_weight(in, *cw));
    return {cw->reduce(rows, reduction, input.scalar_type()), lse};
  }
  const int64_t count = mean_count_cpu(in.target, reduction, ignore_index);
  return {reduce_row_losses(row_loss, reduction, count, input.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t reduction, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& class_weight) {
  check_linear_cross_entropy_args(input, weight, bias, target, reduction, label_smoothing);
  const int64_t B = input.size(0), H = input.size(1), V = weight.size(0);
  const auto acc = at::toOpMathType(input.scalar_type());
  check_saved_lse(lse, input, "input");
  check_grad_loss(grad_loss, reduction, B);
  check_class_weight(class_weight, V, input, "input");
  const Inputs in = prepare(input, weight, bias, target, ignore_index);
  const auto cw = make_class_weight(class_weight, in.target, ignore_index, label_smoothing, acc);
  const at::Tensor base = cw ? cw->base_scales(grad_loss, reduction) : at::Tensor();
  const at::Tensor scale =
      cw ? cw->kernel_scales(base)
         : row_grad_scales(grad_loss, in.target, reduction, ignore_index,
                           mean_count_cpu(in.target, reduction, ignore_index), acc);
  const double label_eps = cw ? 0.0 : label_smoothing;
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_input = at::empty({B, H}, in.input.options());
  at::Tensor grad_weight = at::empty({V, H}, in.input.options());
  at::Tensor grad_bias = at::empty({V}, in.input.options());
  const bool aten = use_aten_gemm(B, V, H);
  AT_DISPATCH_FLOATING_TYPES(in.input.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
    if (aten) {
      blocked_impl<scalar_t, BlockedMode::kGradFromLse>(
          in, lse_c.const_data_ptr<scalar_t>(), nullptr,
          scale.const_data_ptr<scalar_t>(), ignore_index, static_cast<scalar_t>(label_eps),
          grad_input, grad_weight, grad_bias);
      return;
    }
    gradient_impl<scalar_t, false>(
        in, lse_c.const_data_ptr<scalar_t>(), nullptr,
        scale.const_data_ptr<scalar_t>(), ignore_index, static_cast<scalar_t>(label_eps),
        grad_input.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
        grad_bias.mutable_data_ptr<scalar_t>());
  });
  if (cw) {
    cw->add_smoothing_to_linear_grads(base, in.input, in.weight, grad_input, grad_weight,
                                      grad_bias);
  }
  const auto dtype = input.scalar_type();
  return {grad_input.to(dtype), grad_weight.to(dtype), grad_bias.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_and_grads_cpu(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing,
                                   const std::optional<at::Tensor>& class_weight) {
  check_linear_cross_entropy_args(input, weight, bias, target, reduction, label_smoothing);
  check_scalar_loss_reduction(reduction, "linear_cross_entropy_and_grads");
  const int64_t B = input.size(0), H = input.size(1), V = weight.size(0);
  const auto acc = at::toOpMathType(input.scalar_type());
  check_class_weight(class_weight, V, input, "input");
  const Inputs in = prepare(input, weight, bias, target, ignore_index);
  const auto cw = make_class_weight(class_weight, in.target, ignore_index, label_smoothing, acc);
  const int64_t count = cw ? 0 : mean_count_cpu(in.target, reduction, ignore_index);
  const at::Tensor base = cw ? cw->base_scales(at::Tensor(), reduction) : at::Tensor();
  const at::Tensor scale =
      cw ? cw->kernel_scales(base)
         : row_grad_scales(at::Tensor(), in.target, reduction, ignore_index, count, acc);
  const double label_eps = cw ? 0.0 : label_smoothing;
  at::Tensor lse = at::empty({B}, in.input.options());
  at::Tensor row_loss = at::empty({B}, in.input.options());
  at::Tensor grad_input = at::empty({B, H}, in.input.options());
  at::Tensor grad_weight = at::empty({V, H}, in.input.options());
  at::Tensor grad_bias = at::empty({V}, in.input.options());
  const bool aten = use_aten_gemm(B, V, H);
  AT_DISPATCH_FLOATING_TYPES(in.input.scalar_type(), "linear_cross_entropy_and_grads_cpu", [&] {
    if (aten) {
      blocked_impl<scalar_t, BlockedMode::kGradWithForward>(
          in, lse.mutable_data_ptr<scalar_t>(), row_loss.mutable_data_ptr<scalar_t>(),
          scale.const_data_ptr<scalar_t>(), ignore_index, static_cast<scalar_t>(label_eps),
          grad_input, grad_weight, grad_bias);
      return;
    }
    gradient_impl<scalar_t, true>(
        in, lse.mutable_data_ptr<scalar_t>(), row_loss.mutable_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), ignore_index, static_cast<scalar_t>(label_eps),
        grad_input.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
        grad_bias.mutable_data_ptr<scalar_t>());
  });
  const auto dtype = input.scalar_type();
  if (cw) {
    cw->add_smoothing_to_linear_grads(base, in.input, in.weight, grad_input, grad_weight,
                                      grad_bias);
    const at::Tensor rows = cw->row_losses(row_loss, lse, logits_dot_class_weight(in, *cw));
    return {cw->reduce(rows, reduction, dtype), lse, grad_input.to(dtype), grad_weight.to(dtype),
            grad_bias.to(dtype)};
  }
  return {reduce_row_losses(row_loss, reduction, count, dtype), lse, grad_input.to(dtype),
          grad_weight.to(dtype), grad_bias.to(dtype)};
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
