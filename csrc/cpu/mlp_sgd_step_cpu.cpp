// CPU kernel of mlp_sgd_step: one plain-SGD training step of the whole model
// (forward, mean cross-entropy, backward, p -= lr * grad) in a single op.
//
// Why one op: at the lecture's batch of 32 the arithmetic of a step is ~2
// MFLOP (a few microseconds), while an eager PyTorch step issues ~30 ops and
// autograd nodes at ~1-5 us each. Here the per-step cost is one dispatcher
// call, and no [B, *] activation ever leaves the cache:
//
//   shared, once per step:  Wt = W1^T, P_j = table @ W_j^T (folded_layer.h), W2^T
//   per chunk of 64 rows (threads take contiguous ranges of chunks):
//     h       = tanh(b1 + sum_j P_j[idx[:, j]])                 [n, H]
//     logits  = h @ W2^T + b2 (output_layer.h)                   [n, V]
//     loss, dlogits = (softmax - onehot) / count, one exp pass    in place
//     dW2 += dlogits^T h, db2 += colsum, dh = dlogits @ W2       [n, H]
//     dpre = dh (1 - h^2); db1 += colsum; S_j[idx[:, j]] += dpre   (one pass, folded)
//   after the chunks (per-thread partials summed in thread order):
//     dtable = sum_j S_j @ W_j, dW1_j = S_j^T table
//     every parameter -= lr * grad, in place.
// Memory: per thread one S (T*V*H), dW2 (V*H) and two [64, H] chunk buffers;
// nothing scales with B except the caller's idx and target.
//
// The first layer is folded (above) or direct (gather + GEMM per chunk), by the
// cost model of embed_algorithm.h: direct at small batches or large vocabularies,
// where building P each step would cost more than it saves.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/embed_algorithm.h"
#include "cpu/cross_entropy_cpu.h"
#include "cpu/first_layer.h"
#include "cpu/index_check.h"
#include "cpu/output_layer.h"
#include "cpu/workspace.h"

namespace charmlp {

namespace {

constexpr int64_t kIgnoreIndex = -100;

// kFolded picks the first-layer algorithm (embed_algorithm.h has the cost model):
// folded builds P once and scatters into S; direct gathers each chunk's
// embeddings and runs two more small GEMMs per chunk, with no per-step cost
// beyond W1^T, which wins at small batches (the lecture's 32).
template <typename T, bool kFolded>
T sgd_step_impl(const int64_t* idx, const int64_t* target, int64_t count, T* table, T* W1, T* b1,
                T* W2, T* b2, T lr, int64_t B, int64_t Tn, int64_t V, int64_t E, int64_t H) {
  const int64_t TE = Tn * E, Vp = padded_cols<T>(V);
  T* W1t = thread_scratch<T>(Scratch::kSharedA, TE * H);  // [T*E, H]
  transpose_into(W1, H, TE, W1t, H);
  T* P = nullptr;  // [T, V, H]
  if constexpr (kFolded) {
    P = thread_scratch<T>(Scratch::kSharedB, Tn * V * H);
    fold_table_into_weight<T>(table, W1t, P, Tn, V, E, H);
  }
  T* W2t = thread_scratch<T>(Scratch::kSharedC, H * Vp);  // [H, Vp]
  transpose_into(W2, V, H, W2t, Vp);

  // One slot per thread: the first layer's accumulators (folded: S [T, V, H];
  // direct: dW1 [H, T*E] then dtable [V, E]), dW2 [V, H], db2 [V], db1 [H].
  // The loss sums in double.
  const int64_t nL1 = kFolded ? Tn * V * H : H * TE + V * E, nW2 = V * H;
  const int64_t slot_size = nL1 + nW2 + V + H;
  ThreadPartials<T> partials(slot_size);
  std::vector<double> loss_sums(at::get_num_threads(), 0.0);
  const T inv_count = count > 0 ? T(1) / static_cast<T>(count) : T(0);

  at::parallel_for(0, B, kOutputChunkRows, [&](int64_t r0, int64_t r1) {
    T* L1 = partials.slot();
    T* dW2 = L1 + nL1;
    T* db2 = dW2 + nW2;
    T* db1 = db2 + V;
    double& loss_sum = loss_sums[at::get_thread_num()];
    const int64_t C = kOutputChunkRows;
    T* h = thread_scratch<T>(Scratch::kChunkA, C * H);
    T* dh = thread_scratch<T>(Scratch::kChunkB, C * H);
    T* logits = thread_scratch<T>(Scratch::kChunkC, C * (Vp + 3));
    T* lse = logits + C * Vp;
    T* loss = lse + C;
    T* scale = loss + C;
    T* emb = kFolded ? nullptr : thread_scratch<T>(Scratch::kChunkD, 2 * C * TE);
    for (int64_t c0 = r0; c0 < r1; c0 += C) {
      const int64_t n = std::min(C, r1 - c0);
      const int64_t* ci = idx + c0 * Tn;
      const int64_t* ct = target + c0;
      if constexpr (kFolded) {
        folded_forward_rows<T, T>(n, ci, P, b1, h, dh, Tn, V, H);
      } else {
        gather_embedding_rows<T>(n, ci, table, emb, Tn, E);
        direct_forward_rows<T>(n, emb, W1t, b1, h, TE, H);
      }
      output_logits<T>(n, H, V, h, W2t, b2, logits);
      std::fill_n(scale, n, inv_count);
      output_loss_and_dlogits<T>(n, V, logits, ct, kIgnoreIndex, T(0), scale, lse, loss);
      for (int64_t r = 0; r < n; ++r) loss_sum += loss[r];
      output_backward<T>(n, H, V, logits, h, W2, dW2, db2, dh);
      if constexpr (kFolded) {
        folded_tanh_backward_scatter_rows<T>(n, ci, dh, h, db1, L1, Tn, V, H);
      } else {
        tanh_backward_rows<T>(n, dh, h, db1, H);
        direct_backward_rows<T>(n, ci, dh, emb, W1, emb + C * TE, L1, L1 + H * TE, Tn, E, H);
      }
    }
  });

  T* work = thread_scratch<T>(Scratch::kSharedD, slot_size + V * E + TE * H);
  const T* L1 = partials.reduce(work);
  const T* dW2 = L1 + nL1;
  const T* db2 = dW2 + nW2;
  const T* db1 = db2 + V;
  double loss_total = 0.0;
  for (double part : loss_sums) loss_total += part;
  const T loss = count > 0 ? static_cast<T>(loss_total / static_cast<double>(count))
                           : std::numeric_limits<T>::quiet_NaN();

  // Layer-1 gradients need the parameters before the update, so finish them first.
  const T* dW1 = L1;             // [H, T*E]
  const T* dtable = L1 + H * TE;  // [V, E]
  if constexpr (kFolded) {
    T* dt = work + slot_size;
    T* dw = dt + V * E;
    std::fill_n(dt, V * E, T(0));
    folded_weight_grads<T>(L1, W1, table, dt, dw, Tn, V, E, H);
    dtable = dt;
    dW1 = dw;
  }

  auto sgd = [lr](T* p, const T* g, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] -= lr * g[i];
  };
  sgd(table, dtable, V * E);
  sgd(W1, dW1, H * TE);
  sgd(b1, db1, H);
  sgd(W2, dW2, V * H);
  sgd(b2, db2, V);
  return loss;
}

}  // namespace

at::Tensor mlp_sgd_step_cpu(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                            at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                            at::Tensor& bias2, double lr) {
  check_mlp_sgd_step_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
                   "charmlp: mlp_sgd_step on CPU takes float32 or float64 parameters, got ",
                   table.scalar_type(), "; use the autograd path (ops.embed_linear_tanh and "
                   "ops.linear_cross_entropy) for other dtypes");
  const int64_t B = idx.size(0), Tn = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight1.size(0);
  const at::Tensor idx64 = checked_indices_cpu(idx, V, "idx");
  const at::Tensor target64 = checked_indices_cpu(target, V, "target", kIgnoreIndex);
  const int64_t count = count_targets_cpu(target64, kIgnoreIndex);

  // Work on contiguous parameters; copy back only if the caller's were not.
  std::array<at::Tensor*, 5> params{&table, &weight1, &bias1, &weight2, &bias2};
  std::array<at::Tensor, 5> work;
  for (size_t i = 0; i < params.size(); ++i) work[i] = params[i]->contiguous();

  at::Tensor loss = at::empty({}, table.options());
  const bool folded = use_folded(B, Tn, V, E, H);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "mlp_sgd_step_cpu", [&] {
    auto impl = folded ? &sgd_step_impl<scalar_t, true> : &sgd_step_impl<scalar_t, false>;
    loss.fill_(impl(
        idx64.const_data_ptr<int64_t>(), target64.const_data_ptr<int64_t>(), count,
        work[0].mutable_data_ptr<scalar_t>(), work[1].mutable_data_ptr<scalar_t>(),
        work[2].mutable_data_ptr<scalar_t>(), work[3].mutable_data_ptr<scalar_t>(),
        work[4].mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(lr), B, Tn, V, E, H));
  });
  for (size_t i = 0; i < params.size(); ++i) {
    if (!work[i].is_same(*params[i])) params[i]->copy_(work[i]);
  }
  return loss;
}

TORCH_LIBRARY_IMPL(charmlp, CPU, m) { m.impl("mlp_sgd_step", &mlp_sgd_step_cpu); }

}  // namespace charmlp
