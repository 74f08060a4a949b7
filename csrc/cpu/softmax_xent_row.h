// Per-row softmax cross-entropy math shared by the CPU cross_entropy,
// linear_cross_entropy and mlp_sgd_step kernels.
//
// For a row of logits x[0..V) with target t and label smoothing eps:
//   lse  = m + log sum_v exp(x_v - m),  m = max_v x_v   (no overflow at |x| ~ 1e4)
//   loss = lse - (1 - eps) x_t - (eps / V) sum_v x_v
//        = (1 - eps) * (-log p_t) + eps * mean_v(-log p_v)   (F.cross_entropy's definition)
//   dloss/dx_v = p_v - (1 - eps) [v == t] - eps / V,   p_v = exp(x_v - lse)
// Only lse is saved for backward: p is recomputed from x in the same pass that
// writes the gradient, so no [B, V] softmax is ever stored.
#pragma once

#include "cpu/capability.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/vec_math.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Reductions over a row walk it in blocks of kVectorLanes with the lanes past V
// masked (vec_math.h). A plain `omp simd reduction` loop leaves V % 16 elements to
// a scalar remainder loop: at V = 27 those 11 scalar exps cost 4x the vector part,
// and the loss rows cost more than the logits GEMM that produced them.

// The sum (max) of the kVectorLanes partials in l (may be overwritten), as a tree of
// halving vector operations: log2(16) = 4 dependent steps. An `omp simd reduction`
// over the lanes compiles to 15 dependent scalar adds (~60 cycles a row, more than the
// exps at V = 27), and a tree written as loops over halves of the array goes through
// the stack (a store then narrower reloads); for float under AVX-512 and AVX2 the
// intrinsic reductions keep it in registers.
template <typename acc_t>
inline acc_t sum_lanes(acc_t* l) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && kVectorLanes == 16) {
    return _mm512_reduce_add_ps(_mm512_loadu_ps(l));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && kVectorLanes == 16) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(l), _mm256_loadu_ps(l + 8));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
#endif
  for (int64_t w = kVectorLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) l[j] += l[j + w];
  }
  return l[0];
}

template <typename acc_t>
inline acc_t max_lanes(acc_t* l) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && kVectorLanes == 16) {
    return _mm512_reduce_max_ps(_mm512_loadu_ps(l));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && kVectorLanes == 16) {
    const __m256 v = _mm256_max_ps(_mm256_loadu_ps(l), _mm256_loadu_ps(l + 8));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
#endif
  for (int64_t w = kVectorLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) l[j] = l[j + w] > l[j] ? l[j + w] : l[j];
  }
  return l[0];
}

// max_v x_v in acc_t (-inf for V = 0; NaNs are skipped: the exp pass propagates them).
template <typename scalar_t, typename acc_t>
inline acc_t row_max(const scalar_t* x, int64_t V) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t lane_max[kVectorLanes];
  for (int64_t j = 0; j < kVectorLanes; ++j) lane_max[j] = kNegInf;
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      const acc_t xv = v0 + j < V ? static_cast<acc_t>(x[v0 + j]) : kNegInf;
      lane_max[j] = xv > lane_max[j] ? xv : lane_max[j];
    }
  }
  return max_lanes(lane_max);
}

// x: V logits (any float type); returns sum_v exp(x_v - m) in acc_t and sets *m_out = m
// (lse = m + log of it: callers that handle many rows take the logs together, fast_log).
template <typename scalar_t, typename acc_t>
inline acc_t row_sumexp(const scalar_t* x, int64_t V, acc_t* m_out) {
  const acc_t m = row_max<scalar_t, acc_t>(x, V);
  *m_out = m;
  acc_t lane_sum[kVectorLanes] = {};
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      const bool in_row = v0 + j < V;
      const acc_t e = fast_exp<acc_t>((in_row ? static_cast<acc_t>(x[v0 + j]) : m) - m);
      lane_sum[j] += in_row ? e : acc_t(0);
    }
  }
  return sum_lanes(lane_sum);
}

// row_sumexp for n <= kRowsInFlight rows at once (row r at x + r * ld): s[r] and m[r] as
// row_sumexp returns and sets them. One row's max -> exp -> sum is a chain of dependent
// reductions (~100 cycles at V = 27) that leaves the vector units idle; with four rows'
// chains interleaved in one loop the out-of-order core overlaps them. At V = 27 the
// cross_entropy forward went from 24 to 18.5 ns a row (B = 4,096, one thread; F.cross_entropy
// 22.5).
constexpr int64_t kRowsInFlight = 4;

template <typename scalar_t, typename acc_t>
inline void rows_sumexp(const scalar_t* x, int64_t ld, int64_t n, int64_t V, acc_t* m, acc_t* s) {
  if (n != kRowsInFlight) {  // a block's tail
    for (int64_t r = 0; r < n; ++r) s[r] = row_sumexp<scalar_t, acc_t>(x + r * ld, V, m + r);
    return;
  }
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t lane_max[kRowsInFlight][kVectorLanes];
  for (int64_t r = 0; r < kRowsInFlight; ++r) {
    for (int64_t j = 0; j < kVectorLanes; ++j) lane_max[r][j] = kNegInf;
  }
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
    for (int64_t r = 0; r < kRowsInFlight; ++r) {
      const scalar_t* row = x + r * ld;
#pragma omp simd
      for (int64_t j = 0; j < kVectorLanes; ++j) {
        const acc_t xv = v0 + j < V ? static_cast<acc_t>(row[v0 + j]) : kNegInf;
        lane_max[r][j] = xv > lane_max[r][j] ? xv : lane_max[r][j];
      }
    }
  }
  for (int64_t r = 0; r < kRowsInFlight; ++r) m[r] = max_lanes(lane_max[r]);
  acc_t lane_sum[kRowsInFlight][kVectorLanes] = {};
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
    for (int64_t r = 0; r < kRowsInFlight; ++r) {
      const scalar_t* row = x + r * ld;
      const acc_t mr = m[r];
#pragma omp simd
      for (int64_t j = 0; j < kVectorLanes; ++j) {
        const bool in_row = v0 + j < V;
        const acc_t e = fast_exp<acc_t>((in_row ? static_cast<acc_t>(row[v0 + j]) : mr) - mr);
        lane_sum[r][j] += in_row ? e : acc_t(0);
      }
    }
  }
  for (int64_t r = 0; r < kRowsInFlight; ++r) s[r] = sum_lanes(lane_sum[r]);
}

// lse[r] = m_r + log(s_r) for rows whose max m and sum of exps s are in lse and s:
// one vectorized log for a block of rows (fast_log) instead of a libm call per row.
template <typename T>
inline void finish_logsumexp(int64_t n, T* lse, const T* s) {
#pragma omp simd
  for (int64_t r = 0; r < n; ++r) lse[r] += fast_log<T>(s[r]);
}

// Loss of one row given its lse (label smoothing folded in).
template <typename scalar_t, typename acc_t>
inline acc_t row_loss(const scalar_t* x, int64_t V, int64_t target, acc_t lse, acc_t eps) {
  acc_t loss = lse - (acc_t(1) - eps) * static_cast<acc_t>(x[target]);
  if (eps != acc_t(0)) {
    acc_t sx = 0;
#pragma omp simd reduction(+ : sx)
    for (int64_t v = 0; v < V; ++v) sx += static_cast<acc_t>(x[v]);
    loss -= eps / static_cast<acc_t>(V) * sx;
  }
  return loss;
}

// g[v] = scale * (exp(x_v - lse) - (1 - eps) [v == target] - eps / V).
// In lane blocks like the reductions above (g may alias x: each lane reads its
// element before writing it).
template <typename scalar_t, typename acc_t, typename out_t>
inline void row_grad(const scalar_t* x, int64_t V, int64_t target, acc_t lse, acc_t eps,
                     acc_t scale, out_t* g) {
  const acc_t smooth = eps / static_cast<acc_t>(V);
  const acc_t hit = acc_t(1) - eps;
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      const int64_t v = v0 + j;
      if (v < V) {
        const acc_t p = fast_exp<acc_t>(static_cast<acc_t>(x[v]) - lse);
        g[v] = static_cast<out_t>(scale * (p - smooth - (v == target ? hit : acc_t(0))));
      }
    }
  }
}

// y[v] <- exp(x[v] - m), m = max_v x_v (y may be x); returns sum_v exp(x[v] - m) and
// sets *m_out. The shared core of the one-exp-pass loss-and-gradient rows below.
template <typename acc_t>
inline acc_t row_exp(const acc_t* x, acc_t* y, int64_t V, acc_t* m_out) {
  const acc_t m = row_max<acc_t, acc_t>(x, V);
  acc_t lane_sum[kVectorLanes] = {};
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      if (v0 + j < V) {
        const acc_t e = fast_exp<acc_t>(x[v0 + j] - m);
        y[v0 + j] = e;
        lane_sum[j] += e;
      }
    }
  }
  *m_out = m;
  return sum_lanes(lane_sum);
}

// Loss and gradient of one row in one pass over its exps, for callers that know the
// row's gradient scale before the forward (mlp_sgd_step, the *_and_grads ops): the
// exp(x - m) summed for lse are kept and normalized into the softmax, one exp per
// logit instead of the two of row_sumexp + row_grad. x: the V logits; g: the
// gradient (g may be x, in place; a separate g spares the caller a copy).
// The gradient needs 1 / s, not lse, so the log is left to the caller, which takes
// it for a block of rows at once (finish_row_losses: one vector log instead of a
// libm call per row). Returns s = sum_v exp(x_v - m); sets *m_out = m and
// *partial_loss = loss - lse = -(1 - eps) x_t - (eps / V) sum_v x_v.
template <typename acc_t>
inline acc_t row_grad_and_partial_loss(const acc_t* x, acc_t* g, int64_t V, int64_t target,
                                       acc_t eps, acc_t scale, acc_t* m_out,
                                       acc_t* partial_loss) {
  *partial_loss = row_loss<acc_t, acc_t>(x, V, target, acc_t(0), eps);
  const acc_t s = row_exp<acc_t>(x, g, V, m_out);
  const acc_t p_scale = scale / s, smooth = scale * eps / static_cast<acc_t>(V);
  const acc_t hit = scale * (acc_t(1) - eps);
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      const int64_t v = v0 + j;
      if (v < V) g[v] = g[v] * p_scale - smooth - (v == target ? hit : acc_t(0));
    }
  }
  return s;
}

// The same for n rows that share these logits (one context seen n times in a batch)
// and whose targets have the histogram counts[V] (n = sum_v counts[v]):
//   loss = n lse - sum_v counts[v] x[v]                 (*partial_loss = -sum_v counts[v] x[v])
//   x[v] <- scale (n softmax(x)[v] - counts[v])         (in place)
// exactly the sum of the n single-row terms. No label smoothing (mlp_sgd_step's loss).
// Returns s and sets *m_out like row_grad_and_partial_loss.
template <typename acc_t>
inline acc_t row_grad_and_partial_loss_counts(acc_t* x, int64_t V, const acc_t* counts, acc_t n,
                                              acc_t scale, acc_t* m_out, acc_t* partial_loss) {
  acc_t lane_dot[kVectorLanes] = {};
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      if (v0 + j < V) lane_dot[j] += counts[v0 + j] * x[v0 + j];
    }
  }
  *partial_loss = -sum_lanes(lane_dot);
  const acc_t s = row_exp<acc_t>(x, x, V, m_out);
  const acc_t p_scale = scale * n / s;
  for (int64_t v0 = 0; v0 < V; v0 += kVectorLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) {
      const int64_t v = v0 + j;
      if (v < V) x[v] = x[v] * p_scale - scale * counts[v];
    }
  }
  return s;
}

// Finishes n <= kVectorLanes rows of row_grad_and_partial_loss(_counts): lse holds
// their maxima and s their sums of exps; lse[r] <- m_r + log(s_r) (one vector log),
// loss[r] += weight_r lse[r] for the rows with weight_r != 0 (weight: the rows a
// deduplicated row stands for; null for 1 each). skip[r] (may be null) marks rows
// whose loss stays as it is (ignored targets).
template <typename T>
inline void finish_row_losses(int64_t n, const T* s, const T* weight, const bool* skip, T* lse,
                              T* loss) {
  finish_logsumexp<T>(n, lse, s);
  for (int64_t r = 0; r < n; ++r) {
    if (skip && skip[r]) continue;
    loss[r] += weight ? (weight[r] == T(0) ? T(0) : weight[r] * lse[r]) : lse[r];
  }
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
