// CPU kernels of the whole-model ops (one family, one loop):
//   mlp_cross_entropy            the mean cross-entropy of the model (forward only)
//   mlp_cross_entropy_and_grads  the same and its five parameter gradients
//   mlp_sgd_step                 the same, then p -= lr * grad in place
//   mlp_sgd_steps                K such steps in one call (the training loop's inner loop)
// mlp_cross_entropy's autograd (csrc/autograd.cpp) calls the second in its forward
// and only scales the saved gradients in its backward: the parameter gradients are
// smaller than any activation this model has, so computing them while h and the
// logits are still in cache is cheaper than saving activations for a backward.
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
//     every parameter -= lr * grad, in place (mlp_sgd_step).
// Without gradients (mlp_cross_entropy) each chunk stops at the loss.
// Memory: per thread one S (T*V*H), dW2 (V*H) and two [64, H] chunk buffers;
// nothing scales with B except the caller's idx and target.
//
// The first layer is folded (above) or direct (gather + GEMM per chunk), by the
// cost model of embed_algorithm.h weighted for this loop (mlp_use_folded): direct at
// small batches or large vocabularies, where building P each step would cost more
// than it saves.
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

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/context_grouping.h"
#include "cpu/embed_algorithm.h"
#include "cpu/first_layer.h"
#include "cpu/index_check.h"
#include "cpu/kernels.h"
#include "cpu/output_layer.h"
#include "cpu/workspace.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

namespace {

constexpr int64_t kIgnoreIndex = -100;
// Largest key space (V^T) of the distinct-context table.
constexpr int64_t kMaxContextKeys = int64_t{1} << 20;

template <typename T>
struct DistinctContexts {
  std::vector<int64_t> idx;      // U x T: each distinct context once, in order of first appearance
  std::vector<T> rows;           // U: its rows with a counted (non-ignored) target
  std::vector<T> targets;        // U x V: histogram of those rows' targets
  std::vector<int32_t> row_context;  // B: each row's distinct context (for writing logits)
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
  std::vector<int64_t> first_row;
  std::vector<int32_t>& row_context = ctx.row_context;
  row_context.resize(static_cast<size_t>(B));
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
  if (4 * U > 3 * B) {
    row_context.clear();
    return false;
  }
  ctx.U = U;
  ctx.idx.resize(static_cast<size_t>(U * Tn));
  for (int64_t u = 0; u < U; ++u) {
    std::copy_n(idx + first_row[u] * Tn, Tn, ctx.idx.data() + u * Tn);
  }
  // Counts up to B: exact in T when T holds every integer to B (float32 to 2^24). Past
  // that a float32 `+= 1` stops counting (one context repeated 2^25 times would weigh half
  // as much as it should), so such batches count in integers and convert once.
  const bool exact_in_t = B <= (int64_t{1} << std::numeric_limits<T>::digits);
  if (exact_in_t) {
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
  std::vector<int64_t> rows(static_cast<size_t>(U), 0), targets(static_cast<size_t>(U * V), 0);
  for (int64_t b = 0; b < B; ++b) {
    if (target[b] == kIgnoreIndex) continue;
    const int64_t u = row_context[static_cast<size_t>(b)];
    ++rows[u];
    ++targets[u * V + target[b]];
  }
  ctx.rows.assign(rows.begin(), rows.end());
  ctx.targets.assign(targets.begin(), targets.end());
  return true;
}

// The five gradients of the mean loss, in per-call scratch (valid until the
// calling thread's next charmlp call).
template <typename T>
struct MlpGrads {
  const T* table = nullptr;  // [V, E]
  const T* W1 = nullptr;     // [H, T*E]
  const T* b1 = nullptr;     // [H]
  const T* W2 = nullptr;     // [V, H]
  const T* b2 = nullptr;     // [V]
};

// The first-layer algorithm for a loop over `rows` rows. embed_algorithm.h's model
// counts the first layer alone; in the whole model the folded path's per-call work
// (building P, the two weight-gradient GEMMs from S, zeroing and summing each
// thread's S) runs mostly on one thread, while the direct path's per-row GEMMs spread
// over the loop's p threads (one per 64-row chunk). Measured on names.txt batches at
// the lecture's size, direct is the faster up to ~100 rows on one thread and ~200-300
// on two: a fixed cost of 3 p times the layer op's.
inline bool mlp_use_folded(int64_t rows, int64_t T, int64_t V, int64_t E, int64_t H) {
  const int64_t chunks = std::max<int64_t>(1, (rows + kOutputChunkRows - 1) / kOutputChunkRows);
  const int64_t p = std::min<int64_t>(at::get_num_threads(), chunks);
  return use_folded(rows, T, V, E, H, /*fixed_cost_scale=*/3 * p);
}

// The mean loss of the whole model and, with kBackward, its gradients (into *grads);
// with logits_out ([B, V], the batch's rows) also the logits, copied out of the chunk
// before the loss overwrites them with their gradient.
// kFolded picks the first-layer algorithm (embed_algorithm.h has the cost model):
// folded builds P once and scatters into S; direct gathers each chunk's
// embeddings and runs two more small GEMMs per chunk, with no per-step cost
// beyond W1^T, which wins at small batches (the lecture's 32).
template <typename T, bool kFolded, bool kBackward>
T mlp_loss_impl(const int64_t* idx, const int64_t* target, const DistinctContexts<T>* ctx,
                int64_t count, const T* table, const T* W1, const T* b1, const T* W2, const T* b2,
                int64_t B, int64_t Tn, int64_t V, int64_t E, int64_t H, MlpGrads<T>* grads,
                T* logits_out) {
  const int64_t TE = Tn * E, Vp = padded_cols<T>(V);
  // Grouped, the loop runs on distinct contexts: their logits [U, V] first, then each
  // row copies its context's.
  T* context_logits =
      logits_out && ctx ? thread_scratch<T>(Scratch::kSharedE, ctx->U * V) : nullptr;
  T* loop_logits_out = ctx ? context_logits : logits_out;
  T* W1t = thread_scratch<T>(Scratch::kSharedA, TE * H);  // [T*E, H]
  transpose_into(W1, H, TE, W1t, H);
  T* P = nullptr;  // [T, V, H]
  if constexpr (kFolded) {
    P = thread_scratch<T>(Scratch::kSharedB, Tn * V * H);
    fold_table_into_weight<T>(table, W1t, P, Tn, V, E, H);
  }
  T* W2t = thread_scratch<T>(Scratch::kSharedC, H * Vp);  // [H, Vp]
  transpose_into(W2, V, H, W2t, Vp);

  // One slot per thread (backward only): the first layer's accumulators (folded:
  // S [T, V, H]; direct: dW1 [H, T*E] then dtable [V, E]), dW2 [V, H], db2 [V],
  // db1 [H]. The loss sums in double.
  const int64_t nL1 = kFolded ? Tn * V * H : H * TE + V * E, nW2 = V * H;
  const int64_t slot_size = kBackward ? nL1 + nW2 + V + H : 0;
  ThreadPartials<T> partials(slot_size);
  std::vector<double> loss_sums(at::get_num_threads(), 0.0);
  const T inv_count = count > 0 ? T(1) / static_cast<T>(count) : T(0);

  // Rows of the loop: the batch's, or its distinct contexts (ctx).
  const int64_t* row_idx = ctx ? ctx->idx.data() : idx;
  // Whole chunks per thread: a batch of 32 stays on one thread. (Splitting it over two
  // took a tight loop of steps from 22 to 19 us, but the training loop's from 27 to 41:
  // between calls the second thread goes idle and waking it costs more than it saves.
  // Back to back inside one mlp_sgd_steps call, on another day's build machine, 16 rows
  // per thread took a step from ~40 to ~120 us.)
  at::parallel_for(0, ctx ? ctx->U : B, kOutputChunkRows, [&](int64_t r0, int64_t r1) {
    T* L1 = kBackward ? partials.slot() : nullptr;
    T* dW2 = kBackward ? L1 + nL1 : nullptr;
    T* db2 = kBackward ? dW2 + nW2 : nullptr;
    T* db1 = kBackward ? db2 + V : nullptr;
    double& loss_sum = loss_sums[at::get_thread_num()];
    const int64_t C = kOutputChunkRows;
    T* h = thread_scratch<T>(Scratch::kChunkA, C * H);
    T* dh = thread_scratch<T>(Scratch::kChunkB, C * H);  // folded forward: pre-activations
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
      if (logits_out) {
        for (int64_t r = 0; r < n; ++r) {
          std::copy_n(logits + r * Vp, V, loop_logits_out + (c0 + r) * V);
        }
      }
      if constexpr (!kBackward) {
        if (ctx) {
          output_loss_counts<T>(n, V, logits, ctx->targets.data() + c0 * V, ctx->rows.data() + c0,
                                lse, loss);
        } else {
          output_loss_rows<T>(n, V, logits, target + c0, kIgnoreIndex, T(0), lse, loss);
        }
        for (int64_t r = 0; r < n; ++r) loss_sum += loss[r];
        continue;
      }
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

  if (logits_out && ctx) {
    const int32_t* row_context = ctx->row_context.data();
    at::parallel_for(0, B, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        std::copy_n(context_logits + row_context[b] * V, V, logits_out + b * V);
      }
    });
  }
  double loss_total = 0.0;
  for (double part : loss_sums) loss_total += part;
  const T loss = count > 0 ? static_cast<T>(loss_total / static_cast<double>(count))
                           : std::numeric_limits<T>::quiet_NaN();
  if constexpr (kBackward) {
    T* work = thread_scratch<T>(Scratch::kSharedD, slot_size + V * E + TE * H);
    const T* L1 = partials.reduce(work);
    grads->W2 = L1 + nL1;
    grads->b2 = grads->W2 + nW2;
    grads->b1 = grads->b2 + V;
    grads->W1 = L1;             // [H, T*E]
    grads->table = L1 + H * TE;  // [V, E]
    if constexpr (kFolded) {
      T* dt = work + slot_size;
      T* dw = dt + V * E;
      std::fill_n(dt, V * E, T(0));
      folded_weight_grads<T>(L1, W1, table, dt, dw, Tn, V, E, H);
      grads->table = dt;
      grads->W1 = dw;
    }
  }
  return loss;
}

// One batch's rows: idx [B, T] and target [B], range-checked contiguous int64.
struct BatchRows {
  const int64_t* idx;
  const int64_t* target;
  int64_t B, T;
  int64_t count;  // rows whose target is counted (not ignored)
};

// idx [N, T] and target [N] of the whole-model ops, range-checked (all of them, before
// any work), as contiguous int64. mlp_sgd_steps passes its K batches as N = K B rows.
struct CheckedBatch {
  at::Tensor idx, target;

  // Rows [first, first + B) as one batch.
  BatchRows rows(int64_t first, int64_t B) const {
    const int64_t Tn = idx.size(1);
    const int64_t* t = target.const_data_ptr<int64_t>() + first;
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) count += t[b] != kIgnoreIndex;
    return {idx.const_data_ptr<int64_t>() + first * Tn, t, B, Tn, count};
  }
  BatchRows all() const { return rows(0, idx.size(0)); }
};

CheckedBatch check_batch(const at::Tensor& idx, const at::Tensor& target, int64_t V) {
  return {checked_indices_cpu(idx, V, "idx"),
          checked_indices_cpu(target, V, "target", kIgnoreIndex)};
}

// Groups the batch when that pays, picks the first-layer algorithm for the rows the
// loop will run, and runs mlp_loss_impl. params: table, W1, b1, W2, b2 (contiguous).
template <typename T, bool kBackward>
T run_mlp_loss(const BatchRows& batch, const std::array<const T*, 5>& params, int64_t V,
               int64_t E, int64_t H, MlpGrads<T>* grads, T* logits_out = nullptr) {
  DistinctContexts<T> ctx;
  const bool grouped = group_contexts<T>(batch.idx, batch.target, batch.B, batch.T, V, ctx);
  const bool folded = mlp_use_folded(grouped ? ctx.U : batch.B, batch.T, V, E, H);
  auto impl = folded ? &mlp_loss_impl<T, true, kBackward> : &mlp_loss_impl<T, false, kBackward>;
  return impl(batch.idx, batch.target, grouped ? &ctx : nullptr, batch.count, params[0],
              params[1], params[2], params[3], params[4], batch.B, batch.T, V, E, H, grads,
              logits_out);
}

// p -= lr * g.
template <typename T>
void sgd_update(T* p, const T* g, int64_t n, T lr) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] -= lr * g[i];
}

void check_cpu_dtype(const at::Tensor& table, const char* op) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
                   "charmlp: ", op, " on CPU takes float32 or float64 parameters, got ",
                   table.scalar_type(), "; use the autograd path (ops.embed_linear_tanh and "
                   "ops.linear_cross_entropy) for other dtypes");
}

}  // namespace

namespace {

// A whole-model op's inputs after the checks: the batch, and the five parameters as
// contiguous tensors (views of the caller's when they already are).
struct MlpInputs {
  CheckedBatch batch;
  std::array<at::Tensor, 5> params;  // table, weight1, bias1, weight2, bias2
  int64_t V, E, H;

  template <typename T>
  std::array<const T*, 5> ptrs() const {
    return {params[0].const_data_ptr<T>(), params[1].const_data_ptr<T>(),
            params[2].const_data_ptr<T>(), params[3].const_data_ptr<T>(),
            params[4].const_data_ptr<T>()};
  }
};

// After check_mlp_args (or check_mlp_sgd_step_args).
MlpInputs prepare_mlp(const at::Tensor& idx, const at::Tensor& target, const at::Tensor& table,
                      const at::Tensor& weight1, const at::Tensor& bias1,
                      const at::Tensor& weight2, const at::Tensor& bias2, const char* op) {
  check_cpu_dtype(table, op);
  const int64_t V = table.size(0);
  return {check_batch(idx, target, V),
          {table.contiguous(), weight1.contiguous(), bias1.contiguous(), weight2.contiguous(),
           bias2.contiguous()},
          V, table.size(1), weight1.size(0)};
}

}  // namespace

namespace {

// The whole-model forward ops share one body: the loss, the logits [B, V] when
// want_logits, the five gradients when want_grads.
struct MlpForward {
  at::Tensor logits, loss;
  std::array<at::Tensor, 5> grads;
};

MlpForward mlp_forward_cpu(const at::Tensor& idx, const at::Tensor& target,
                           const at::Tensor& table, const at::Tensor& weight1,
                           const at::Tensor& bias1, const at::Tensor& weight2,
                           const at::Tensor& bias2, const char* op, bool want_logits,
                           bool want_grads) {
  check_mlp_args(idx, target, table, weight1, bias1, weight2, bias2);
  const MlpInputs in = prepare_mlp(idx, target, table, weight1, bias1, weight2, bias2, op);
  MlpForward out;
  out.loss = at::empty({}, table.options());
  if (want_logits) out.logits = at::empty({idx.size(0), in.V}, table.options());
  if (want_grads) {
    for (size_t i = 0; i < out.grads.size(); ++i) out.grads[i] = at::empty_like(in.params[i]);
  }
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "mlp_forward_cpu", [&] {
    scalar_t* logits = want_logits ? out.logits.mutable_data_ptr<scalar_t>() : nullptr;
    if (!want_grads) {
      out.loss.fill_(run_mlp_loss<scalar_t, false>(in.batch.all(), in.ptrs<scalar_t>(), in.V,
                                                   in.E, in.H, nullptr, logits));
      return;
    }
    MlpGrads<scalar_t> grads;
    out.loss.fill_(run_mlp_loss<scalar_t, true>(in.batch.all(), in.ptrs<scalar_t>(), in.V, in.E,
                                                in.H, &grads, logits));
    const std::array<const scalar_t*, 5> src{grads.table, grads.W1, grads.b1, grads.W2, grads.b2};
    for (size_t i = 0; i < out.grads.size(); ++i) {
      std::copy_n(src[i], out.grads[i].numel(), out.grads[i].mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

at::Tensor mlp_cross_entropy_cpu(const at::Tensor& idx, const at::Tensor& target,
                                 const at::Tensor& table, const at::Tensor& weight1,
                                 const at::Tensor& bias1, const at::Tensor& weight2,
                                 const at::Tensor& bias2) {
  return mlp_forward_cpu(idx, target, table, weight1, bias1, weight2, bias2,
                         "mlp_cross_entropy", false, false)
      .loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_cross_entropy_and_grads_cpu(const at::Tensor& idx, const at::Tensor& target,
                                const at::Tensor& table, const at::Tensor& weight1,
                                const at::Tensor& bias1, const at::Tensor& weight2,
                                const at::Tensor& bias2) {
  auto out = mlp_forward_cpu(idx, target, table, weight1, bias1, weight2, bias2,
                             "mlp_cross_entropy_and_grads", false, true);
  const auto& g = out.grads;
  return {out.loss, g[0], g[1], g[2], g[3], g[4]};
}

// The same, and the logits [B, V] as well (the model's forward with targets).
std::tuple<at::Tensor, at::Tensor> mlp_logits_cross_entropy_cpu(
    const at::Tensor& idx, const at::Tensor& target, const at::Tensor& table,
    const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2) {
  auto out = mlp_forward_cpu(idx, target, table, weight1, bias1, weight2, bias2,
                             "mlp_logits_cross_entropy", true, false);
  return {out.logits, out.loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_logits_cross_entropy_and_grads_cpu(const at::Tensor& idx, const at::Tensor& target,
                                       const at::Tensor& table, const at::Tensor& weight1,
                                       const at::Tensor& bias1, const at::Tensor& weight2,
                                       const at::Tensor& bias2) {
  auto out = mlp_forward_cpu(idx, target, table, weight1, bias1, weight2, bias2,
                             "mlp_logits_cross_entropy_and_grads", true, true);
  const auto& g = out.grads;
  return {out.logits, out.loss, g[0], g[1], g[2], g[3], g[4]};
}

namespace {

// K plain-SGD steps of the contiguous parameters in.params: step k runs on rows
// [k B, (k + 1) B) of in.batch with lr[k] and writes its pre-update loss to losses[k]
// ([K], the parameters' dtype). Each step is the same computation whatever K is, so
// K calls of one step and one call of K steps are bitwise equal. Then copies the
// parameters back into the caller's tensors where those were not contiguous.
void run_sgd_steps(const MlpInputs& in, int64_t K, int64_t B, c10::ArrayRef<double> lr,
                   const std::array<at::Tensor*, 5>& params, at::Tensor& losses) {
  const std::array<at::Tensor, 5>& work = in.params;
  AT_DISPATCH_FLOATING_TYPES(work[0].scalar_type(), "mlp_sgd_steps_cpu", [&] {
    scalar_t* out = losses.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      MlpGrads<scalar_t> grads;
      // The gradients are complete (layer 1's needs the parameters before the update)
      // when run_mlp_loss returns; only then is anything written.
      out[k] = run_mlp_loss<scalar_t, true>(in.batch.rows(k * B, B), in.ptrs<scalar_t>(), in.V,
                                            in.E, in.H, &grads);
      const std::array<const scalar_t*, 5> g{grads.table, grads.W1, grads.b1, grads.W2,
                                             grads.b2};
      for (size_t i = 0; i < work.size(); ++i) {
        sgd_update<scalar_t>(work[i].mutable_data_ptr<scalar_t>(), g[i], work[i].numel(),
                             static_cast<scalar_t>(lr[k]));
      }
    }
  });
  for (size_t i = 0; i < params.size(); ++i) {
    if (!work[i].is_same(*params[i])) params[i]->copy_(work[i]);
  }
}

}  // namespace

at::Tensor mlp_sgd_step_cpu(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                            at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                            at::Tensor& bias2, double lr) {
  check_mlp_sgd_step_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  const MlpInputs in =
      prepare_mlp(idx, target, table, weight1, bias1, weight2, bias2, "mlp_sgd_step");
  at::Tensor loss = at::empty({}, table.options());
  run_sgd_steps(in, /*K=*/1, idx.size(0), {lr}, {&table, &weight1, &bias1, &weight2, &bias2},
                loss);
  return loss;
}

at::Tensor mlp_sgd_steps_cpu(const at::Tensor& idx, const at::Tensor& target, at::Tensor& table,
                             at::Tensor& weight1, at::Tensor& bias1, at::Tensor& weight2,
                             at::Tensor& bias2, c10::ArrayRef<double> lr) {
  check_mlp_sgd_steps_args(idx, target, table, weight1, bias1, weight2, bias2, lr);
  const int64_t K = idx.size(0), B = idx.size(1);
  // One check of all K B rows before the first step (prepare_mlp): nothing is updated
  // when any index is bad.
  const MlpInputs in = prepare_mlp(idx.flatten(0, 1), target.flatten(0, 1), table, weight1,
                                   bias1, weight2, bias2, "mlp_sgd_steps");
  at::Tensor losses = at::empty({K}, table.options());
  run_sgd_steps(in, K, B, lr, {&table, &weight1, &bias1, &weight2, &bias2}, losses);
  return losses;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
