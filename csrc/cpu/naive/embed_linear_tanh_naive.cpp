// embed_linear_tanh, naive CPU version (the kernel tour's version 1; kernel_impl.h).
//
// idx is (B, T), table (V, E), weight (H, T*E), bias (H); out is (B, H). K = T*E.
// Forward:   out[b, h] = tanh(bias[h] + sum_j sum_e weight[h, j*E + e] * table[idx[b, j], e])
// Backward, from the saved output (tanh' = 1 - out^2):
//   dpre[b, h]               = grad_out[b, h] * (1 - out[b, h]^2)                    (B, H)
//   grad_bias[h]             = sum_b dpre[b, h]                                      (H)
//   grad_weight[h, j*E + e]  = sum_b dpre[b, h] * table[idx[b, j], e]                (H, K)
//   grad_table[v, e]         = sum over (b, j) with idx[b, j] == v of
//                              sum_h dpre[b, h] * weight[h, j*E + e]                 (V, E)
// Plain loops, accumulating in float (double for double), and in double for the sums over
// the batch, whose rounding error in float would grow with B.
// The fast version (embed_linear_tanh_cpu.cpp) folds table into weight (a row costs T*H adds,
// not 2*T*E*H flops) or runs register-blocked SIMD GEMMs, with a vectorized tanh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/index_check.h"
#include "cpu/naive/naive_cpu.h"

namespace charmlp::naive {

using CHARMLP_CPU_CAPABILITY::checked_indices_cpu;  // the fast kernels' index check

namespace {

template <typename scalar_t>
void forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
             const scalar_t* bias, scalar_t* out, int64_t B, int64_t T, int64_t E, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = T * E;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {  // rows are independent
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        acc_t pre = bias != nullptr ? static_cast<acc_t>(bias[h]) : acc_t(0);
        for (int64_t j = 0; j < T; ++j) {
          const scalar_t* emb = table + idx[b * T + j] * E;  // row idx[b, j] of the table
          for (int64_t e = 0; e < E; ++e) {
            pre += static_cast<acc_t>(weight[h * K + j * E + e]) * static_cast<acc_t>(emb[e]);
          }
        }
        out[b * H + h] = static_cast<scalar_t>(std::tanh(pre));
      }
    }
  });
}

template <typename scalar_t>
void backward(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
              const scalar_t* table, const scalar_t* weight, scalar_t* grad_table,
              scalar_t* grad_weight, scalar_t* grad_bias, int64_t B, int64_t T, int64_t V,
              int64_t E, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = T * E;
  std::vector<acc_t> dpre(B * H);
  for (int64_t i = 0; i < B * H; ++i) {
    const acc_t o = static_cast<acc_t>(out[i]);
    dpre[i] = static_cast<acc_t>(grad_out[i]) * (acc_t(1) - o * o);
  }
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {  // each h owns its outputs
    for (int64_t h = h0; h < h1; ++h) {
      double db = 0;
      for (int64_t b = 0; b < B; ++b) db += dpre[b * H + h];
      grad_bias[h] = static_cast<scalar_t>(db);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k / E, e = k % E;
        double dw = 0;
        for (int64_t b = 0; b < B; ++b) {
          dw += dpre[b * H + h] * static_cast<acc_t>(table[idx[b * T + j] * E + e]);
        }
        grad_weight[h * K + k] = static_cast<scalar_t>(dw);
      }
    }
  });
  // Rows may share a table row: one thread, rows in order (deterministic, no atomics).
  std::vector<double> dtable(V * E, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < T; ++j) {
      for (int64_t e = 0; e < E; ++e) {
        acc_t demb = 0;  // d loss / d table[idx[b, j], e] from this (b, j)
        for (int64_t h = 0; h < H; ++h) {
          demb += dpre[b * H + h] * static_cast<acc_t>(weight[h * K + j * E + e]);
        }
        dtable[idx[b * T + j] * E + e] += demb;
      }
    }
  }
  for (int64_t i = 0; i < V * E; ++i) grad_table[i] = static_cast<scalar_t>(dtable[i]);
}

}  // namespace

at::Tensor embed_linear_tanh_naive_cpu(const at::Tensor& idx, const at::Tensor& table,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  check_embed_linear_tanh_args(idx, table, weight, bias);  // as embed_linear_tanh_cpu
  const at::Tensor idx64 = checked_indices_cpu(idx, table.size(0), "idx");
  const int64_t B = idx.size(0), T = idx.size(1), E = table.size(1), H = weight.size(0);
  const at::Tensor table_c = table.contiguous(), weight_c = weight.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, H}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(),
                                  "embed_linear_tanh_naive_cpu", [&] {
    forward<scalar_t>(idx64.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
                      weight_c.const_data_ptr<scalar_t>(),
                      bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                      out.mutable_data_ptr<scalar_t>(), B, T, E, H);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_naive_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight) {
  check_embed_linear_tanh_backward_args(grad_out, out, idx, table, weight);
  const at::Tensor idx64 = checked_indices_cpu(idx, table.size(0), "idx");
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  const at::Tensor table_c = table.contiguous(), weight_c = weight.contiguous();
  at::Tensor grad_table = at::empty({V, E}, table.options());
  at::Tensor grad_weight = at::empty({H, T * E}, table.options());
  at::Tensor grad_bias = at::empty({H}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(),
                                  "embed_linear_tanh_backward_naive_cpu", [&] {
    backward<scalar_t>(go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                       idx64.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
                       weight_c.const_data_ptr<scalar_t>(), grad_table.mutable_data_ptr<scalar_t>(),
                       grad_weight.mutable_data_ptr<scalar_t>(),
                       grad_bias.mutable_data_ptr<scalar_t>(), B, T, V, E, H);
  });
  return {grad_table, grad_weight, grad_bias};
}

}  // namespace charmlp::naive
