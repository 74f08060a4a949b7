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
//
// Distinct contexts. Rows with the same context (idx row) have the same h and the
// same logits, and with V^T small (27^3 = 19,683 at the lecture's size) a batch
// repeats contexts a lot: the 228,146 rows of names.txt hold 5,686 distinct ones,
// a batch of 4,096 about 1,350. The step then runs on the U distinct contexts, each
// with the number n_u of its rows that have a counted target and the histogram c_u
// of their targets:
//   loss_u    = n_u lse_u - sum_v c_u[v] x_u[v]
//   dlogits_u = (n_u softmax(x_u) - c_u) / count
// which are exactly the sums of the rows' own terms (only the order of additions
// changes); every later gradient is linear in dlogits, so it follows. Grouping is
// one serial pass over the batch with a direct-address table of the V^T keys, so
// it is used only when that table is small next to the batch and the batch does
// repeat itself (at most 3/4 of its rows distinct).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/context_grouping.h"
#include "cpu/embed_algorithm.h"
#include "cpu/cross_entropy_cpu.h"
#include "cpu/first_layer.h"
#include "cpu/index_check.h"
#include "cpu/output_layer.h"
#include "cpu/workspace.h"

namespace charmlp {

namespace {
std::atomic<bool> g_context_grouping{true};
}  // namespace

void set_context_grouping(bool enabled) { g_context_grouping.store(enabled); }
bool get_context_grouping() { return g_context_grouping.load(); }

namespace {

constexpr int64_t kIgnoreIndex = -100;
// Largest key space (V^T) of the distinct-context table.
constexpr int64_t kMaxContextKeys = int64_t{1} << 20;

template <typename T>
struct DistinctContexts {
  std::vector<int64_t> idx;      // U x T: each distinct context once, in order of first appearance
  std::vector<T> rows;           // U: its rows with a counted (non-ignored) target
  std::vector<T> targets;        // U x V: histogram of those rows' targets
  int64_t U = 0;
};

// Groups the batch by context (see the header comment). Returns false, leaving ctx
// empty, when grouping would not pay: a key table larger than 128 B entries (it is
// rebuilt every step), or more than 3/4 of the rows distinct.
template <typename T>
bool group_contexts(const int64_t* idx, const int64_t* target, int64_t B, int64_t Tn,
                    int64_t V, DistinctContexts<T>& ctx) {
  // (B > 0 rows passed the index check, so V >= 1 below.)
  if (B == 0 || !get_context_grouping()) return false;
  int64_t keys = 1;
  for (int64_t j = 0; j < Tn; ++j) {
    if (keys > kMaxContextKeys / V) return false;
    keys *= V;
  }
  if (keys > 128 * B) return false;
  // A fresh table each call: clearing it is O(V^T) <= O(128 B), and measured faster than
  // keeping one between calls (a freshly cleared table is cache resident).
  std::vector<int32_t> slot(static_cast<size_t>(keys), -1);
  std::vector<int32_t> row_context(static_cast<size_t>(B));
  std::vector<int64_t> first_row;
  for (int64_t b = 0; b < B; ++b) {
    int64_t key = 0;
    for (int64_t j = 0; j < Tn; ++j) key = key * V + idx[b * Tn + j];
    int32_t& u = slot[static_cast<size_t>(key)];
    if (u < 0) {
      u = static_cast<int32_t>(first_row.size());
      first_row.push_back(b);
    }
    row_context[static_cast<size_t>(b)] = u;
  }
  const int64_t U = static_cast<int64_t>(first_row.size());
  if (4 * U > 3 * B) return false;
  ctx.U = U;
  ctx.idx.resize(static_cast<size_t>(U * Tn));
  for (int64_t u = 0; u < U; ++u) {
    std::copy_n(idx + first_row[u] * Tn, Tn, ctx.idx.data() + u * Tn);
  }
  ctx.rows.assign(static_cast<size_t>(U), T(0));
  ctx.targets.assign(static_cast<size_t>(U * V), T(0));
  for (int64_t b = 0; b < B; ++b) {
    if (target[b] == kIgnoreIndex) continue;
    const int64_t u = row_context[static_cast<size_t>(b)];
    ctx.rows[u] += T(1);
    ctx.targets[u * V + target[b]] += T(1);
  }
  return true;
}

// kFolded picks the first-layer algorithm (embed_algorithm.h has the cost model):
// folded builds P once and scatters into S; direct gathers each chunk's
// embeddings and runs two more small GEMMs per chunk, with no per-step cost
// beyond W1^T, which wins at small batches (the lecture's 32).
template <typename T, bool kFolded>
T sgd_step_impl(const int64_t* idx, const int64_t* target, const DistinctContexts<T>* ctx,
                int64_t count, T* table, T* W1, T* b1, T* W2, T* b2, T lr, int64_t B, int64_t Tn,
                int64_t V, int64_t E, int64_t H) {
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

  // Rows of the loop: the batch's, or its distinct contexts (ctx).
  const int64_t* row_idx = ctx ? ctx->idx.data() : idx;
  at::parallel_for(0, ctx ? ctx->U : B, kOutputChunkRows, [&](int64_t r0, int64_t r1) {
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
      const int64_t* ci = row_idx + c0 * Tn;
      if constexpr (kFolded) {
        folded_forward_rows<T, T>(n, ci, P, b1, h, dh, Tn, V, H);
      } else {
        gather_embedding_rows<T>(n, ci, table, emb, Tn, E);
        direct_forward_rows<T>(n, emb, W1t, b1, h, TE, H);
      }
      output_logits<T>(n, H, V, h, W2t, b2, logits);
      if (ctx) {
        output_loss_and_dlogits_counts<T>(n, V, logits, ctx->targets.data() + c0 * V,
                                          ctx->rows.data() + c0, inv_count, lse, loss);
      } else {
        std::fill_n(scale, n, inv_count);
        output_loss_and_dlogits<T>(n, V, logits, target + c0, kIgnoreIndex, T(0), scale, lse,
                                   loss);
      }
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
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "mlp_sgd_step_cpu", [&] {
    const int64_t* idx_p = idx64.const_data_ptr<int64_t>();
    const int64_t* target_p = target64.const_data_ptr<int64_t>();
    DistinctContexts<scalar_t> ctx;
    const bool grouped = group_contexts<scalar_t>(idx_p, target_p, B, Tn, V, ctx);
    // The first-layer cost model counts the rows the loop will run.
    const bool folded = use_folded(grouped ? ctx.U : B, Tn, V, E, H);
    auto impl = folded ? &sgd_step_impl<scalar_t, true> : &sgd_step_impl<scalar_t, false>;
    loss.fill_(impl(idx_p, target_p, grouped ? &ctx : nullptr, count,
                    work[0].mutable_data_ptr<scalar_t>(), work[1].mutable_data_ptr<scalar_t>(),
                    work[2].mutable_data_ptr<scalar_t>(), work[3].mutable_data_ptr<scalar_t>(),
                    work[4].mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(lr), B, Tn, V, E,
                    H));
  });
  for (size_t i = 0; i < params.size(); ++i) {
    if (!work[i].is_same(*params[i])) params[i]->copy_(work[i]);
  }
  return loss;
}

TORCH_LIBRARY_IMPL(charmlp, CPU, m) { m.impl("mlp_sgd_step", &mlp_sgd_step_cpu); }

}  // namespace charmlp
