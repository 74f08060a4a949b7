// The first layer, h = tanh(concat_j table[idx[:, j]] @ W^T + b), on CPU,
// shared by embed_linear_tanh and mlp_sgd_step.
//
// Folded: the embedding folded into the weight.
// With W_j = weight[:, j*E:(j+1)*E] the slice that sees context position j,
//   pre[b] = bias + sum_j W_j table[idx[b, j]] = bias + sum_j P_j[idx[b, j]],
//   P_j = table @ W_j^T  [V, H].
// Building P costs 2*T*V*E*H flops once; afterwards a row costs T*H adds
// instead of 2*T*E*H flops. The backward mirrors it: scatter dpre into
// S_j[v] = sum over rows with idx[b, j] = v of dpre[b] ([T, V, H]), then
//   grad_W_j = S_j^T @ table,   grad_table = sum_j S_j @ W_j.
#pragma once

#include "cpu/capability.h"

#include <algorithm>
#include <cstdint>

#include "cpu/small_gemm.h"
#include "cpu/vec_math.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// P [T, V, H]: P_j = table [V, E] @ Wt[j*E:(j+1)*E, :], with Wt = weight^T [T*E, H].
template <typename T>
inline void fold_table_into_weight(const T* table, const T* Wt, T* P, int64_t Tn, int64_t V,
                                   int64_t E, int64_t H) {
  for (int64_t j = 0; j < Tn; ++j) {
    small_gemm<T>(V, H, E, row_major(table, E), Wt + j * E * H, H, P + j * V * H, H,
                  /*accumulate=*/false);
  }
}

// Context positions handled by the single-pass loops below (the lecture has 3, the
// large benchmark 8); longer contexts take a pass per position through a row buffer.
constexpr int64_t kFoldedMaxPositions = 8;

// out[r] = tanh(bias + sum_j P[j, idx[r, j]]) for n rows.  idx n x T, out n x H, bias H or null
template <typename T, typename out_t>
inline void folded_forward_rows(int64_t n, const int64_t* idx, const T* P, const T* bias,
                                out_t* out, T* scratch, int64_t Tn, int64_t V, int64_t H) {
  for (int64_t r = 0; r < n; ++r) {
    T* a = scratch;  // H values
    if (bias) {
      std::copy_n(bias, H, a);
    } else {
      std::fill_n(a, H, T(0));
    }
    for (int64_t j = 0; j < Tn; ++j) {
      const T* row = P + (j * V + idx[r * Tn + j]) * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) a[h] += row[h];
    }
    out_t* o = out + r * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) o[h] = static_cast<out_t>(fast_tanh<T>(a[h]));
  }
}

// For n rows: dh <- dpre = dh * (1 - h^2) in place, and dbias += dpre.  dh, h n x H
template <typename T>
inline void tanh_backward_rows(int64_t n, T* dh, const T* h, T* dbias, int64_t H) {
  for (int64_t r = 0; r < n; ++r) {
    T* d = dh + r * H;
    const T* hr = h + r * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      d[k] *= T(1) - hr[k] * hr[k];
      dbias[k] += d[k];
    }
  }
}

// S[j, idx[r, j]] += dpre[r] for n rows.  idx n x T, dpre n x H, S T x V x H
template <typename T>
inline void folded_scatter_rows(int64_t n, const int64_t* idx, const T* dpre, T* S, int64_t Tn,
                                int64_t V, int64_t H) {
  for (int64_t r = 0; r < n; ++r) {
    const T* d = dpre + r * H;
    for (int64_t j = 0; j < Tn; ++j) {
      T* s = S + (j * V + idx[r * Tn + j]) * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) s[k] += d[k];
    }
  }
}

// tanh_backward_rows then folded_scatter_rows in one pass: dpre = dh (1 - h^2) is
// formed in a register, added to dbias and to the row's T slices of S, and never
// stored (past kFoldedMaxPositions positions the two passes run, with dpre in dh:
// treat dh as clobbered).  idx n x T, dh, h n x H, dbias H, S T x V x H
template <typename T>
inline void folded_tanh_backward_scatter_rows(int64_t n, const int64_t* idx, T* dh,
                                              const T* h, T* dbias, T* S, int64_t Tn, int64_t V,
                                              int64_t H) {
  if (Tn > kFoldedMaxPositions) {
    for (int64_t r = 0; r < n; ++r) {
      T* d = dh + r * H;
      tanh_backward_rows<T>(1, d, h + r * H, dbias, H);
      folded_scatter_rows<T>(1, idx + r * Tn, d, S, Tn, V, H);
    }
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* d = dh + r * H;
    const T* hr = h + r * H;
    T* rows[kFoldedMaxPositions];
    for (int64_t j = 0; j < Tn; ++j) rows[j] = S + (j * V + idx[r * Tn + j]) * H;
    for (int64_t k0 = 0; k0 < H; k0 += kVectorLanes) {  // as in folded_forward_rows
      T dp[kVectorLanes];
#pragma omp simd
      for (int64_t i = 0; i < kVectorLanes; ++i) {
        const bool in = k0 + i < H;
        const T hv = in ? hr[k0 + i] : T(0);
        dp[i] = in ? d[k0 + i] * (T(1) - hv * hv) : T(0);
        if (in) dbias[k0 + i] += dp[i];
      }
      // Rows of different positions lie in disjoint slices S_j: no aliasing.
      for (int64_t j = 0; j < Tn; ++j) {
        T* s = rows[j] + k0;
#pragma omp simd
        for (int64_t i = 0; i < kVectorLanes; ++i) {
          if (k0 + i < H) s[i] += dp[i];
        }
      }
    }
  }
}

// Direct: emb [n, T*E] = concat_j table[idx[r, j]] for n rows (a chunk, not the batch).
template <typename T>
inline void gather_embedding_rows(int64_t n, const int64_t* idx, const T* table, T* emb,
                                  int64_t Tn, int64_t E) {
  // A vector loop, not std::copy_n: rows of E = 10 floats made that a memmove call
  // per row, ~3% of the lecture's B = 32 step.
  for (int64_t r = 0; r < n * Tn; ++r) {
    const T* src = table + idx[r] * E;
    T* dst = emb + r * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) dst[e] = src[e];
  }
}

// Direct: h [n, H] = tanh(bias + emb [n, T*E] @ Wt [T*E, H]); bias may be null.
template <typename T>
inline void direct_forward_rows(int64_t n, const T* emb, const T* Wt, const T* bias, T* h,
                                int64_t TE, int64_t H) {
  for (int64_t r = 0; r < n; ++r) {
    if (bias) {
      std::copy_n(bias, H, h + r * H);
    } else {
      std::fill_n(h + r * H, H, T(0));
    }
  }
  small_gemm<T>(n, H, TE, row_major(emb, TE), Wt, H, h, H, /*accumulate=*/true);
#pragma omp simd
  for (int64_t i = 0; i < n * H; ++i) h[i] = fast_tanh<T>(h[i]);
}

// grad_table[idx[r, j]] += demb[r, j*E:(j+1)*E] for n rows, in row order (repeated
// indices accumulate in a fixed order).  idx n x T, demb n x (T*E), grad_table V x E
template <typename T>
inline void scatter_embedding_grads(int64_t n, const int64_t* idx, const T* demb, T* grad_table,
                                    int64_t Tn, int64_t E) {
  for (int64_t r = 0; r < n * Tn; ++r) {
    T* dst = grad_table + idx[r] * E;
    const T* src = demb + r * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) dst[e] += src[e];
  }
}

// Direct: grad_weight [H, T*E] += dpre^T @ emb, and grad_table[idx[r, j]] += (dpre @ W)[r, j*E:].
// dpre n x H, emb n x (T*E), weight H x (T*E), demb n x (T*E) scratch, grad_table V x E.
template <typename T>
inline void direct_backward_rows(int64_t n, const int64_t* idx, const T* dpre, const T* emb,
                                 const T* weight, T* demb, T* grad_weight, T* grad_table,
                                 int64_t Tn, int64_t E, int64_t H) {
  const int64_t TE = Tn * E;
  small_gemm<T>(H, TE, n, transposed(dpre, H), emb, TE, grad_weight, TE, /*accumulate=*/true);
  small_gemm<T>(n, TE, H, row_major(dpre, H), weight, TE, demb, TE, /*accumulate=*/false);
  scatter_embedding_grads<T>(n, idx, demb, grad_table, Tn, E);
}

// grad_table [V, E] = sum_j S_j @ W_j  and  grad_weight [H, T*E] with columns
// j*E:(j+1)*E = S_j^T @ table, written in the weight's own layout so the update
// that follows is a contiguous (vectorized) pass.
// S T x V x H, weight H x (T*E) (nn.Linear layout), table V x E.
template <typename T>
inline void folded_weight_grads(const T* S, const T* weight, const T* table, T* grad_table,
                                T* grad_weight, int64_t Tn, int64_t V, int64_t E, int64_t H) {
  for (int64_t j = 0; j < Tn; ++j) {
    const T* Sj = S + j * V * H;
    // grad_table += S_j [V, H] @ W_j [H, E]; W_j is weight's columns j*E.. (row stride T*E).
    small_gemm<T>(V, E, H, row_major(Sj, H), weight + j * E, Tn * E, grad_table, E,
                  /*accumulate=*/j > 0);
    // grad_weight[:, j*E:(j+1)*E] = S_j^T [H, V] @ table [V, E].
    small_gemm<T>(H, E, V, transposed(Sj, H), table, E, grad_weight + j * E, Tn * E,
                  /*accumulate=*/false);
  }
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
