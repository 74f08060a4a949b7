// The output layer (linear + softmax cross-entropy) on one chunk of rows,
// shared by linear_cross_entropy and mlp_sgd_step on CPU.
//
// Shapes: n rows in the chunk, H hidden, V vocabulary.
//   forward    logits = h @ W^T + b                      [n, V]  (chunk scratch only)
//              lse, loss per row                         (softmax_xent_row.h)
//   backward   dlogits = scale * (softmax - target dist)  [n, V]  (in place of logits)
//              dW += dlogits^T @ h   [V, H]    db += colsum(dlogits)   [V]
//              dh  = dlogits @ W     [n, H]
// Working a chunk at a time keeps logits in L1 and means the [B, V] logits
// (and softmax) are never stored: only lse [B] survives the forward.
#pragma once

#include "cpu/capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/small_gemm.h"
#include "cpu/softmax_xent_row.h"
#include "cpu/workspace.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Rows per chunk: h (64 x 200 floats = 50 KB) and logits stay cache resident.
constexpr int64_t kOutputChunkRows = 64;

// logits [n, V] = h [n, H] @ W^T + b, with W^T given as Wt [H, Vp] (Vp = padded_cols<T>(V),
// zero beyond V) so every GEMM column block is full width and aligned; logits has
// leading dimension Vp too. b may be null.
template <typename T>
inline void output_logits(int64_t n, int64_t H, int64_t V, const T* h, const T* Wt, const T* b,
                          T* logits) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r = 0; r < n; ++r) {
    T* row = logits + r * Vp;
    for (int64_t v = 0; v < Vp; ++v) row[v] = (b && v < V) ? b[v] : T(0);
  }
  small_gemm<T>(n, Vp, H, row_major(h, H), Wt, Vp, logits, Vp, /*accumulate=*/true);
}

// lse[r] and loss[r] (0 for ignored rows) from logits [n, V] (leading dimension padded_cols<T>(V)).
template <typename T>
inline void output_loss_rows(int64_t n, int64_t V, const T* logits, const int64_t* target,
                             int64_t ignore_index, T eps, T* lse, T* loss) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r = 0; r < n; r += kRowsInFlight) {  // lse <- max, loss <- sum of exps
    rows_sumexp<T, T>(logits + r * Vp, Vp, std::min(kRowsInFlight, n - r), V, lse + r, loss + r);
  }
  finish_logsumexp<T>(n, lse, loss);
  for (int64_t r = 0; r < n; ++r) {
    loss[r] = target[r] == ignore_index ? T(0)
                                        : row_loss<T, T>(logits + r * Vp, V, target[r], lse[r], eps);
  }
}

// In place: logits [n, V] -> dlogits, row r scaled by scale[r] (0 for ignored rows).
template <typename T>
inline void output_dlogits(int64_t n, int64_t V, T* logits, const int64_t* target,
                           int64_t ignore_index, T eps, const T* lse, const T* scale) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r = 0; r < n; ++r) {
    T* row = logits + r * Vp;
    if (target[r] == ignore_index) {
      std::fill_n(row, V, T(0));
    } else {
      row_grad<T, T, T>(row, V, target[r], lse[r], eps, scale[r], row);
    }
  }
}

// output_loss_rows then output_dlogits in one pass per row (row_grad_and_partial_loss),
// for callers that know the gradient scales before the forward: one exp per logit,
// and one vector log per kVectorLanes rows.
template <typename T>
inline void output_loss_and_dlogits(int64_t n, int64_t V, T* logits, const int64_t* target,
                                    int64_t ignore_index, T eps, const T* scale, T* lse, T* loss) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r0 = 0; r0 < n; r0 += kVectorLanes) {
    const int64_t block = std::min<int64_t>(kVectorLanes, n - r0);
    T s[kVectorLanes];
    bool ignored[kVectorLanes];
    for (int64_t i = 0; i < block; ++i) {
      const int64_t r = r0 + i;
      T* row = logits + r * Vp;
      ignored[i] = target[r] == ignore_index;
      if (ignored[i]) {
        s[i] = row_sumexp<T, T>(row, V, lse + r);
        loss[r] = T(0);
        std::fill_n(row, V, T(0));
      } else {
        s[i] = row_grad_and_partial_loss<T>(row, row, V, target[r], eps, scale[r], lse + r,
                                            loss + r);
      }
    }
    finish_row_losses<T>(block, s, /*weight=*/nullptr, ignored, lse + r0, loss + r0);
  }
}

// output_loss_and_dlogits for deduplicated rows (mlp_sgd_step): row r stands for
// rows[r] rows of the batch with these logits, whose targets have the histogram
// counts [n, V]; loss[r] is their summed loss, dlogits their summed gradient.
template <typename T>
inline void output_loss_and_dlogits_counts(int64_t n, int64_t V, T* logits, const T* counts,
                                           const T* rows, T scale, T* lse, T* loss) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r0 = 0; r0 < n; r0 += kVectorLanes) {
    const int64_t block = std::min<int64_t>(kVectorLanes, n - r0);
    T s[kVectorLanes];
    for (int64_t i = 0; i < block; ++i) {
      const int64_t r = r0 + i;
      s[i] = row_grad_and_partial_loss_counts<T>(logits + r * Vp, V, counts + r * V, rows[r],
                                                 scale, lse + r, loss + r);
    }
    finish_row_losses<T>(block, s, rows + r0, /*skip=*/nullptr, lse + r0, loss + r0);
  }
}

// Loss only, for deduplicated rows (mlp_cross_entropy without gradients): row r
// stands for rows[r] rows with these logits and the target histogram counts [n, V];
// loss[r] = rows[r] lse - sum_v counts[v] x[v], their summed loss.
// lse is [n] scratch.
template <typename T>
inline void output_loss_counts(int64_t n, int64_t V, const T* logits, const T* counts,
                               const T* rows, T* lse, T* loss) {
  const int64_t Vp = padded_cols<T>(V);
  for (int64_t r = 0; r < n; r += kRowsInFlight) {  // lse <- max, loss <- sum of exps
    rows_sumexp<T, T>(logits + r * Vp, Vp, std::min(kRowsInFlight, n - r), V, lse + r, loss + r);
  }
  finish_logsumexp<T>(n, lse, loss);
  for (int64_t r = 0; r < n; ++r) {
    const T* x = logits + r * Vp;
    const T* c = counts + r * V;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t v = 0; v < V; ++v) dot += c[v] * x[v];
    loss[r] = rows[r] == T(0) ? T(0) : rows[r] * lse[r] - dot;
  }
}

// dW [V, H] += dlogits^T @ h, db [V] += colsum(dlogits), dh [n, H] = dlogits @ W.
// dlogits has leading dimension padded_cols<T>(V).
template <typename T>
inline void output_backward(int64_t n, int64_t H, int64_t V, const T* dlogits, const T* h,
                            const T* W, T* dW, T* db, T* dh) {
  const int64_t Vp = padded_cols<T>(V);
  small_gemm<T>(V, H, n, transposed(dlogits, Vp), h, H, dW, H, /*accumulate=*/true);
  for (int64_t r = 0; r < n; ++r) {
    const T* d = dlogits + r * Vp;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) db[v] += d[v];
  }
  if (dh) small_gemm<T>(n, H, V, row_major(dlogits, Vp), W, H, dh, H, /*accumulate=*/false);
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
