// CPU kernels of embed_linear_tanh: out = tanh(concat_j table[idx[:, j]] @ W^T + b).
//
// Notation: B rows, T context positions, V vocabulary, E embedding width,
// H hidden width; W_j = weight[:, j*E:(j+1)*E] is the [H, E] slice that sees
// position j, so pre[b] = b + sum_j W_j table[idx[b, j]].
//
// Forward, two algorithms (picked by the cost model in embed_algorithm.h):
//   folded  P_j = table @ W_j^T  [V, H];  pre[b] = bias + sum_j P_j[idx[b, j]]
//   direct  a tile of gathered rows [rows, T*E] times W^T, one tile at a time,
//           so the [B, T*E] embedding is never materialized.
//
// Backward, from the saved output (tanh' = 1 - out^2):
//   dpre = grad_out * (1 - out^2)                                [B, H]
//   grad_bias = sum_b dpre[b]                                    [H]
//   folded: S_j[v] = sum_{b : idx[b, j] = v} dpre[b]             [T, V, H]
//           grad_W_j = S_j^T @ table   grad_table = sum_j S_j @ W_j
//   direct: grad_W = dpre^T @ emb (tile by tile)
//           grad_table[idx[b, j]] += (dpre @ W)[b, j*E:(j+1)*E]
// The scatter into S (or grad_table) is the only data-dependent write. It is
// parallelized over columns of H, never over rows, so each thread owns its
// columns outright: no atomics, no per-thread copies, and the summation order
// is fixed, which keeps results bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "cpu/embed_algorithm.h"
#include "cpu/first_layer.h"
#include "cpu/index_check.h"
#include "cpu/kernels.h"
#include "cpu/vec_math.h"
#include "cpu/workspace.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

namespace {

// Rows per tile of the direct algorithm: big enough for an efficient GEMM,
// small enough that the tile ([rows, T*E]) stays in L2 for typical T*E.
constexpr int64_t kDirectTileRows = 512;
// Columns of H per parallel task in the column-owned passes.
constexpr int64_t kColumnGrain = 32;
// Below this many B*H elements the column-owned pass runs on one thread.
constexpr int64_t kSerialWork = 1 << 15;
// Direct algorithm: up to this many multiply-adds per GEMM (B*H*T*E) the GEMMs run
// through small_gemm.h on 64-row chunks (first_layer.h, as in mlp_sgd_step) instead
// of ATen's: at the lecture's B = 32 each at::addmm / at::mm call costs more in
// dispatch and BLAS setup than its arithmetic. Larger problems keep ATen's
// multithreaded, cache-blocked GEMMs.
constexpr int64_t kSmallDirectMacs = int64_t{1} << 22;
constexpr int64_t kSmallDirectChunk = 64;
// The folded path's per-call work (T GEMMs of [V, E] @ [E, H] for P, the [T, V, H] scatter
// target of the backward) runs well below the direct path's one large GEMM per tile: at
// T = 8, E = 64, H = 1,024, V = 27, B = 32 the flop count favoured folded by 15% but it
// took 2.4x longer (734 against 300 us forward, one thread). Weighing its fixed work
// double keeps such batches direct; the lecture's B >= 256 stay folded.
constexpr int64_t kFoldedFixedCostScale = 2;
}  // namespace

namespace {

// Copies table rows for rows [b0, b0 + n) into tile (first_layer.h's gather, in
// parallel: here the tile is up to kDirectTileRows rows).  idx B x T, table V x E, tile n x (T*E)
template <typename acc_t>
void gather_tile(const int64_t* idx, const acc_t* table, acc_t* tile, int64_t b0, int64_t n,
                 int64_t T, int64_t E) {
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    gather_embedding_rows<acc_t>(r1 - r0, idx + (b0 + r0) * T, table, tile + r0 * T * E, T, E);
  });
}

// In place: x = tanh(x) over n values.
template <typename acc_t>
void tanh_inplace(acc_t* x, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) x[i] = fast_tanh<acc_t>(x[i]);
  });
}

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  at::Tensor out = at::empty({B, H}, table.options());
  if (B == 0 || H == 0) return out;

  const at::Tensor table_acc = table.to(acc_dtype).contiguous();
  const at::Tensor weight_acc = weight.to(acc_dtype).contiguous();
  const std::optional<at::Tensor> bias_acc =
      bias ? std::optional<at::Tensor>(bias->to(acc_dtype).contiguous()) : std::nullopt;
  const int64_t* idx_p = idx.const_data_ptr<int64_t>();

  if (use_folded(B, T, V, E, H, kFoldedFixedCostScale)) {
    const std::vector<acc_t> Wt = transpose_copy(weight_acc.const_data_ptr<acc_t>(), H, T * E);
    std::vector<acc_t> P(static_cast<size_t>(T * V * H));
    fold_table_into_weight<acc_t>(table_acc.const_data_ptr<acc_t>(), Wt.data(), P.data(), T, V, E,
                                  H);
    const acc_t* b = bias_acc ? bias_acc->const_data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / H), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> scratch(static_cast<size_t>(H));
      folded_forward_rows<acc_t, scalar_t>(b1 - b0, idx_p + b0 * T, P.data(), b, o + b0 * H,
                                           scratch.data(), T, V, H);
    });
    return out;
  }

  // Direct: accumulate in acc_t (out itself when scalar_t is already acc_t).
  at::Tensor out_acc = std::is_same_v<scalar_t, acc_t> ? out : at::empty({B, H}, table_acc.options());
  if (B * H * T * E <= kSmallDirectMacs) {
    const int64_t TE = T * E;
    const std::vector<acc_t> Wt = transpose_copy(weight_acc.const_data_ptr<acc_t>(), H, TE);
    const acc_t* b = bias_acc ? bias_acc->const_data_ptr<acc_t>() : nullptr;
    const acc_t* tp = table_acc.const_data_ptr<acc_t>();
    acc_t* o = out_acc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, kSmallDirectChunk, [&](int64_t b0, int64_t b1) {
      acc_t* emb = thread_scratch<acc_t>(Scratch::kChunkD, kSmallDirectChunk * TE);
      for (int64_t c0 = b0; c0 < b1; c0 += kSmallDirectChunk) {
        const int64_t n = std::min(kSmallDirectChunk, b1 - c0);
        gather_embedding_rows<acc_t>(n, idx_p + c0 * T, tp, emb, T, E);
        direct_forward_rows<acc_t>(n, emb, Wt.data(), b, o + c0 * H, TE, H);
      }
    });
    if (!out_acc.is_same(out)) out.copy_(out_acc);
    return out;
  }
  at::Tensor tile = at::empty({std::min(B, kDirectTileRows), T * E}, table_acc.options());
  const at::Tensor weight_t = weight_acc.t();
  for (int64_t b0 = 0; b0 < B; b0 += kDirectTileRows) {
    const int64_t n = std::min(kDirectTileRows, B - b0);
    gather_tile<acc_t>(idx_p, table_acc.const_data_ptr<acc_t>(), tile.mutable_data_ptr<acc_t>(),
                       b0, n, T, E);
    at::Tensor dst = out_acc.narrow(0, b0, n);
    if (bias_acc) {
      at::addmm_out(dst, *bias_acc, tile.narrow(0, 0, n), weight_t);
    } else {
      at::mm_out(dst, tile.narrow(0, 0, n), weight_t);
    }
  }
  tanh_inplace<acc_t>(out_acc.mutable_data_ptr<acc_t>(), B * H);
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return out;
}

// One pass over grad_out and out, parallel over columns of H: writes
// grad_bias and either the folded sums S (T x V x H) or dpre (B x H).
//   grad_out, out B x H; idx B x T; grad_bias H; S T x V x H (or null); dpre B x H (or null)
template <typename scalar_t, typename acc_t>
void dpre_pass(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
               acc_t* grad_bias, acc_t* S, acc_t* dpre, int64_t B, int64_t T, int64_t V,
               int64_t H) {
  // Small problems run on one thread: waking the OpenMP team costs more.
  const int64_t grain = B * H < kSerialWork ? H : kColumnGrain;
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    const int64_t w = h1 - h0;
    std::vector<acc_t> d(w);
    std::vector<acc_t> bsum(w, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* g = grad_out + b * H + h0;
      const scalar_t* o = out + b * H + h0;
      acc_t* dp = d.data();
      acc_t* bs = bsum.data();
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) {
        const acc_t ok = static_cast<acc_t>(o[k]);
        dp[k] = static_cast<acc_t>(g[k]) * (acc_t(1) - ok * ok);
        bs[k] += dp[k];
      }
      if (S) {
        for (int64_t j = 0; j < T; ++j) {
          acc_t* s = S + (j * V + idx[b * T + j]) * H + h0;
#pragma omp simd
          for (int64_t k = 0; k < w; ++k) s[k] += dp[k];
        }
      } else {
        std::copy_n(dp, w, dpre + b * H + h0);
      }
    }
    std::copy_n(bsum.data(), w, grad_bias + h0);
  });
}

// The direct backward for large problems: ATen's (multithreaded, cache-blocked)
// GEMMs per tile of kDirectTileRows rows, then the table scatter in row order.
//   dpre B x H; grad_weight H x (T*E) and grad_table V x E accumulated in place
template <typename acc_t>
void direct_backward_tiles(const at::Tensor& dpre, const int64_t* idx_p, const at::Tensor& table_acc,
                           const at::Tensor& weight_acc, at::Tensor& grad_weight,
                           at::Tensor& grad_table, int64_t B, int64_t T, int64_t E) {
  const int64_t rows = std::min(B, kDirectTileRows);
  at::Tensor tile = at::empty({rows, T * E}, table_acc.options());
  at::Tensor demb = at::empty({rows, T * E}, table_acc.options());
  for (int64_t b0 = 0; b0 < B; b0 += kDirectTileRows) {
    const int64_t n = std::min(kDirectTileRows, B - b0);
    gather_tile<acc_t>(idx_p, table_acc.const_data_ptr<acc_t>(), tile.mutable_data_ptr<acc_t>(), b0,
                       n, T, E);
    const at::Tensor dpre_blk = dpre.narrow(0, b0, n);
    if (b0 == 0) {  // the first tile writes grad_weight: no zero fill and re-read of [H, T*E]
      at::mm_out(grad_weight, dpre_blk.t(), tile.narrow(0, 0, n));
    } else {
      grad_weight.addmm_(dpre_blk.t(), tile.narrow(0, 0, n));
    }
    at::Tensor demb_blk = demb.narrow(0, 0, n);
    at::mm_out(demb_blk, dpre_blk, weight_acc);
    // Serial scatter keeps the accumulation order fixed; it is O(n*T*E), a factor H
    // below the GEMMs around it.
    scatter_embedding_grads<acc_t>(n, idx_p + b0 * T, demb.const_data_ptr<acc_t>(),
                                   grad_table.mutable_data_ptr<acc_t>(), T, E);
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out,
                                                             const at::Tensor& out,
                                                             const at::Tensor& idx,
                                                             const at::Tensor& table,
                                                             const at::Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  const auto acc_opts = table.options().dtype(acc_dtype);

  const at::Tensor table_acc = table.to(acc_dtype).contiguous();
  const at::Tensor weight_acc = weight.to(acc_dtype).contiguous();
  at::Tensor grad_bias = at::empty({H}, acc_opts);
  at::Tensor grad_table, grad_weight;
  const int64_t* idx_p = idx.const_data_ptr<int64_t>();

  if (use_folded(B, T, V, E, H, kFoldedFixedCostScale)) {
    at::Tensor S = at::zeros({T, V, H}, acc_opts);
    dpre_pass<scalar_t, acc_t>(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                               idx_p, grad_bias.mutable_data_ptr<acc_t>(),
                               S.mutable_data_ptr<acc_t>(), nullptr, B, T, V, H);
    grad_table = at::zeros({V, E}, acc_opts);
    grad_weight = at::empty({H, T * E}, acc_opts);
    folded_weight_grads<acc_t>(S.const_data_ptr<acc_t>(), weight_acc.const_data_ptr<acc_t>(),
                               table_acc.const_data_ptr<acc_t>(), grad_table.mutable_data_ptr<acc_t>(),
                               grad_weight.mutable_data_ptr<acc_t>(), T, V, E, H);
  } else {
    at::Tensor dpre = at::empty({B, H}, acc_opts);
    dpre_pass<scalar_t, acc_t>(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                               idx_p, grad_bias.mutable_data_ptr<acc_t>(), nullptr,
                               dpre.mutable_data_ptr<acc_t>(), B, T, V, H);
    const bool small = B * H * T * E <= kSmallDirectMacs;
    // The small path accumulates into grad_weight; the tiles' first GEMM writes it.
    grad_weight = small ? at::zeros({H, T * E}, acc_opts) : at::empty({H, T * E}, acc_opts);
    grad_table = at::zeros({V, E}, acc_opts);
    if (small) {
      // One thread, chunks in order: the table scatter's order is fixed.
      const int64_t TE = T * E;
      acc_t* emb = thread_scratch<acc_t>(Scratch::kChunkD, 2 * kSmallDirectChunk * TE);
      const acc_t* dp = dpre.const_data_ptr<acc_t>();
      for (int64_t c0 = 0; c0 < B; c0 += kSmallDirectChunk) {
        const int64_t n = std::min(kSmallDirectChunk, B - c0);
        gather_embedding_rows<acc_t>(n, idx_p + c0 * T, table_acc.const_data_ptr<acc_t>(), emb, T,
                                     E);
        direct_backward_rows<acc_t>(n, idx_p + c0 * T, dp + c0 * H, emb,
                                    weight_acc.const_data_ptr<acc_t>(), emb + kSmallDirectChunk * TE,
                                    grad_weight.mutable_data_ptr<acc_t>(),
                                    grad_table.mutable_data_ptr<acc_t>(), T, E, H);
      }
    } else {
      direct_backward_tiles<acc_t>(dpre, idx_p, table_acc, weight_acc, grad_weight, grad_table, B, T,
                                   E);
    }
  }
  const auto dtype = table.scalar_type();
  return {grad_table.to(dtype).contiguous(), grad_weight.to(dtype).contiguous(),
          grad_bias.to(dtype)};
}

}  // namespace

at::Tensor embed_linear_tanh_cpu(const at::Tensor& idx, const at::Tensor& table,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_embed_linear_tanh_args(idx, table, weight, bias);
  const at::Tensor idx64 = checked_indices_cpu(idx, table.size(0), "idx");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(),
                                  "embed_linear_tanh_cpu", [&] {
    out = forward_impl<scalar_t>(idx64, table.contiguous(), weight.contiguous(), bias);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight) {
  check_embed_linear_tanh_backward_args(grad_out, out, idx, table, weight);
  const at::Tensor idx64 = checked_indices_cpu(idx, table.size(0), "idx");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(),
                                  "embed_linear_tanh_backward_cpu", [&] {
    grads = backward_impl<scalar_t>(grad_out.contiguous(), out.contiguous(), idx64, table, weight);
  });
  return grads;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
