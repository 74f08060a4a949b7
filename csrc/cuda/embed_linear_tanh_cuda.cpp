// Host side of the CUDA embed_linear_tanh ops: argument checks, allocation, the
// choice of table-gradient algorithm, and the dispatcher registration. The kernels
// and the math are in embed_linear_tanh_kernels.cu.
#include <ATen/Context.h>
#include <torch/library.h>

#include "cpu/embed_algorithm.h"
#include "cuda/host_common.h"
#include "cuda/ops_cuda.h"
#include "kernel_impl.h"

namespace charmlp {
namespace cuda {

namespace {

// V * E above which the owned-entry deterministic reduction (cost ~ V*E*B*T / threads)
// gives way to ATen's sort-based index_put_.
constexpr int64_t kOwnedMaxEntries = 4096;
// Indices per chunk of the owned reduction (32 KiB of shared memory).
constexpr int64_t kOwnedMaxPositions = 4096;
// Below this many rows the folded algorithm's extra launches cost more than it saves.
constexpr int64_t kFoldedMinRows = 2048;

// Direct (tiled GEMMs over the gathered embedding) or folded (P = table @ W_j^T, then
// memory-bound gather / scatter passes over [B, H]; see embed_linear_tanh_kernels.cu).
// Same cost model and the same process-wide override (charmlp._C._set_embed_algorithm)
// as the CPU kernels, plus a minimum batch: on a GPU each extra launch costs microseconds.
// Never with T * E == 0: there is nothing to fold, a T = 0 fold GEMM would be an
// empty (invalid) launch, and the folded backward would leave grad_table unwritten.
bool cuda_use_folded(int64_t B, int64_t T, int64_t V, int64_t E) {
  if (T * E == 0) return false;
  switch (get_embed_algorithm()) {
    case EmbedAlgorithm::kDirect: return false;
    case EmbedAlgorithm::kFolded: return true;
    case EmbedAlgorithm::kAuto: break;
  }
  return B >= kFoldedMinRows && V * E + 2 * B < B * E;
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
  const int64_t H = weight.size(0), K = T * E;
  const cudaStream_t stream = current_stream();
  const IndexErrorRecord err = index_error_record();

  at::Tensor grad_weight = at::empty({H, K}, weight.options());
  at::Tensor grad_bias = at::empty({H}, weight.options());
  if (B == 0 || H == 0) {
    // H == 0: no GEMM runs, but idx is still checked (like on CPU); out is not touched.
    launch_embed_forward<scalar_t>(idx.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(),
                                   weight.const_data_ptr<scalar_t>(), nullptr, nullptr, B, T, V, E,
                                   H, err, stream);
    grad_weight.zero_();
    grad_bias.zero_();
    return {at::zeros_like(table, at::MemoryFormat::Contiguous), grad_weight, grad_bias};
  }
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();

  // Folded: one deterministic scatter pass over [B, H] plus tiny GEMMs (no atomics).
  int lanes = 0;
  int64_t chunks = 0, rows_per_chunk = 0;
  if (cuda_use_folded(B, T, V, E) &&
      embed_folded_backward_plan(B, T, V, H, sizeof(acc_t), &lanes, &chunks, &rows_per_chunk)) {
    const auto acc_opts = table.options().dtype(acc_dtype);
    at::Tensor partial = at::empty({chunks, T * V + 1, H}, acc_opts);
    at::Tensor S = at::empty({T * V + 1, H}, acc_opts);
    at::Tensor grad_table = at::empty({V, E}, table.options());
    launch_embed_folded_backward<scalar_t, acc_t>(
        go, o, ip, table.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>(), S.mutable_data_ptr<acc_t>(),
        grad_table.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
        grad_bias.mutable_data_ptr<scalar_t>(), lanes, chunks, rows_per_chunk, B, T, V, E, H, err,
        stream);
    return {grad_table, grad_weight, grad_bias};
  }

  // Direct. (1) grad_weight and grad_bias, the B rows split across blocks.
  int64_t rows_per_split = 0;
  const int64_t splits = embed_grad_weight_splits(B, K, H, &rows_per_split);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, H, K + 1}, table.options().dtype(acc_dtype));
  launch_embed_grad_weight<scalar_t, acc_t>(
      go, o, ip, table.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
      grad_bias.mutable_data_ptr<scalar_t>(), splits > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr,
      splits, rows_per_split, B, T, V, E, H, err, stream);

  // (2) grad_emb = dpre @ W scattered into the table gradient.
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor grad_table_acc = at::zeros({V, E}, table.options().dtype(acc_dtype));
  if (K > 0) {
    if (!deterministic) {
      launch_embed_grad_emb<scalar_t, acc_t>(go, o, ip, weight.const_data_ptr<scalar_t>(),
                                             grad_table_acc.mutable_data_ptr<acc_t>(), nullptr, B,
                                             T, V, E, H, err, stream);
    } else {
      at::Tensor grad_emb = at::empty({B, K}, grad_table_acc.options());
      launch_embed_grad_emb<scalar_t, acc_t>(go, o, ip, weight.const_data_ptr<scalar_t>(), nullptr,
                                             grad_emb.mutable_data_ptr<acc_t>(), B, T, V, E, H,
                                             err, stream);
      // T <= kOwnedMaxPositions keeps a chunk's indices (rows * T) within the 32 KiB
      // of shared memory the owned kernel is launched with.
      if (V * E <= kOwnedMaxEntries && T <= kOwnedMaxPositions) {
        // (3) owned-entry reduction over row chunks, chunks summed in order.
        const int64_t rows = std::max<int64_t>(
            1, std::min<int64_t>(kOwnedMaxPositions / std::max<int64_t>(T, 1),
                                 (B + 2 * num_sms() - 1) / (2 * num_sms())));
        const int64_t chunks = (B + rows - 1) / rows;
        at::Tensor part = at::empty({chunks, V, E}, grad_table_acc.options());
        launch_table_grad_owned<acc_t>(grad_emb.const_data_ptr<acc_t>(), ip,
                                       part.mutable_data_ptr<acc_t>(),
                                       grad_table_acc.mutable_data_ptr<acc_t>(), rows, chunks, B, T,
                                       V, E, stream);
      } else {
        // Large V * E: ATen's deterministic (sort-based) accumulation. Rows of bad
        // indices are 0 in grad_emb (and recorded); send them to row 0.
        at::Tensor flat = idx.reshape({B * T});
        flat = at::where(flat.ge(0).logical_and(flat.lt(V)), flat, at::zeros_like(flat));
        grad_table_acc.index_put_({flat}, grad_emb.view({B * T, E}), /*accumulate=*/true);
      }
    }
  }
  at::Tensor grad_table = grad_table_acc.scalar_type() == table.scalar_type()
                              ? grad_table_acc
                              : grad_table_acc.to(table.scalar_type());
  return {grad_table, grad_weight, grad_bias};
}

}  // namespace

at::Tensor embed_linear_tanh_launch(const at::Tensor& idx, const at::Tensor& table,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  check_embed_linear_tanh_args(idx, table, weight, bias);
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor idx_c = index_tensor(idx), table_c = table.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), E = table.size(1);
  const int64_t H = weight.size(0);
  at::Tensor out = at::empty({B, H}, table.options());
  const bool folded = B > 0 && H > 0 && cuda_use_folded(B, T, V, E);
  CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "embed_linear_tanh_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (folded) {
      at::Tensor P = at::empty({T, V, H}, table.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      launch_embed_folded_forward<scalar_t, acc_t>(
          idx_c.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
          weight_c.const_data_ptr<scalar_t>(),
          bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
          P.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), B, T, V, E, H,
          index_error_record(), current_stream());
      return;
    }
    launch_embed_forward<scalar_t>(idx_c.const_data_ptr<int64_t>(), table_c.const_data_ptr<scalar_t>(),
                                   weight_c.const_data_ptr<scalar_t>(),
                                   bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                                   out.mutable_data_ptr<scalar_t>(), B, T, V, E, H,
                                   index_error_record(), current_stream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_launch(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight) {
  check_embed_linear_tanh_backward_args(grad_out, out, idx, table, weight);
  const c10::cuda::CUDAGuard guard(table.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  const at::Tensor idx_c = index_tensor(idx);
  CHARMLP_DISPATCH_FLOAT(table.scalar_type(), "embed_linear_tanh_backward_cuda", [&] {
    grads = backward_impl<scalar_t>(grad_out.contiguous(), out.contiguous(), idx_c,
                                    table.contiguous(), weight.contiguous());
  });
  return grads;
}

namespace {

at::Tensor embed_linear_tanh_cuda(const at::Tensor& idx, const at::Tensor& table,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (use_naive_kernels()) return embed_linear_tanh_naive_cuda(idx, table, weight, bias);
  at::Tensor out = embed_linear_tanh_launch(idx, table, weight, bias);
  const c10::cuda::CUDAGuard guard(table.device());
  check_index_errors();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& idx,
    const at::Tensor& table, const at::Tensor& weight) {
  if (use_naive_kernels()) {
    return embed_linear_tanh_backward_naive_cuda(grad_out, out, idx, table, weight);
  }
  auto grads = embed_linear_tanh_backward_launch(grad_out, out, idx, table, weight);
  const c10::cuda::CUDAGuard guard(table.device());
  check_index_errors();
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CUDA, m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_cuda);
  m.impl("embed_linear_tanh_backward", &embed_linear_tanh_backward_cuda);
}

}  // namespace cuda
}  // namespace charmlp
