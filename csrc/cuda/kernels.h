// The boundary between the host wrappers (csrc/cuda/*_cuda.cpp, compiled by the host
// compiler, which see at::Tensor and the dispatcher) and the kernels
// (csrc/cuda/*_kernels.cu, compiled by nvcc, which see only raw pointers).
//
// Why the split: ATen's and the dispatcher's headers are large, and nvcc parses a .cu
// file once per target architecture plus once for the host. Kept out of the .cu files,
// a kernel file compiles in a few seconds per arch instead of ~30 s, which is most of
// the CUDA build time on a 2-core CI machine.
//
// Every launcher runs on the given stream, never synchronizes, and is explicitly
// instantiated for float, double, c10::Half and c10::BFloat16 in its .cu file.
// Shapes: B rows, T context, V vocabulary, E embedding width, K = T*E, H hidden.
// Index arrays are contiguous int64 (the host converts int32 first).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace charmlp {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Index errors (see runtime_cuda.cpp for how they become Python exceptions).
// The record is 4 uint64 in device memory: [0] set flag, [1] offending value,
// [2] flat position, [3] (bound << 8) | argument code.
// ---------------------------------------------------------------------------------------
enum IndexArg : int64_t { kArgIdx = 1, kArgTarget = 2 };

struct IndexErrorRecord {
  unsigned long long* slot;
};

// Device address of the current device's record (index_record.cu).
unsigned long long* index_error_slot_address();

// Host helpers (runtime_cuda.cpp).
IndexErrorRecord index_error_record();  // the current device's record
void check_index_errors();              // raise a recorded error (see runtime_cuda.cpp)
int num_sms();
size_t max_dynamic_smem();              // usable dynamic shared memory per block
void set_dynamic_smem_impl(const void* kernel, size_t bytes);

// Checks p[0, n) against [0, bound), recording the first bad value it meets (for
// kArgTarget, ignore_index also passes), and reads nothing else: for the degenerate
// shapes where no kernel reads an index array, and for ops that must know every
// index is good before they write anything (mlp_sgd_steps). index_record.cu.
void launch_check_index_range(const int64_t* p, int64_t n, int64_t bound, IndexArg arg,
                              int64_t ignore_index, IndexErrorRecord err, cudaStream_t stream);

constexpr int64_t kReductionNone = 0, kReductionMean = 1, kReductionSum = 2;

// ---------------------------------------------------------------------------------------
// embed_linear_tanh (embed_linear_tanh_kernels.cu)
// ---------------------------------------------------------------------------------------

// out [B, H] = tanh(gather(table, idx) @ weight^T + bias); bias may be null.
template <typename scalar_t>
void launch_embed_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                          const scalar_t* bias, scalar_t* out, int64_t B, int64_t T, int64_t V,
                          int64_t E, int64_t H, IndexErrorRecord err, cudaStream_t stream);

// grad_weight [H, K] and grad_bias [H] from dpre = grad_out * (1 - out^2):
// splits > 1 writes partial [splits, H, K + 1] (acc dtype) and sums it in order.
template <typename scalar_t, typename acc_t>
void launch_embed_grad_weight(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                              const scalar_t* table, scalar_t* grad_weight, scalar_t* grad_bias,
                              acc_t* partial, int64_t splits, int64_t rows_per_split, int64_t B,
                              int64_t T, int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                              cudaStream_t stream);

// grad_emb = dpre @ weight, either atomically added into grad_table_acc [V, E]
// (grad_emb == null) or stored to grad_emb [B, K] (grad_table_acc == null).
template <typename scalar_t, typename acc_t>
void launch_embed_grad_emb(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                           const scalar_t* weight, acc_t* grad_table_acc, acc_t* grad_emb,
                           int64_t B, int64_t T, int64_t V, int64_t E, int64_t H,
                           IndexErrorRecord err, cudaStream_t stream);

// Deterministic table gradient from grad_emb [B, K]: chunk c of `rows` rows writes
// partial [chunks, V, E]; then grad_table_acc [V, E] = sum over chunks in order.
template <typename acc_t>
void launch_table_grad_owned(const acc_t* grad_emb, const int64_t* idx, acc_t* partial,
                             acc_t* grad_table_acc, int64_t rows, int64_t chunks, int64_t B,
                             int64_t T, int64_t V, int64_t E, cudaStream_t stream);

// Folded algorithm (large batches, small vocabulary): P [T, V, H] scratch (acc).
template <typename scalar_t, typename acc_t>
void launch_embed_folded_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                                 const scalar_t* bias, acc_t* P, scalar_t* out, int64_t B,
                                 int64_t T, int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                                 cudaStream_t stream);

// Whether the folded backward fits (shared memory) and its launch shape; partial is
// [chunks, T V + 1, H] and S [T V + 1, H], both acc dtype.
bool embed_folded_backward_plan(int64_t B, int64_t T, int64_t V, int64_t H, size_t acc_size,
                                int* lanes, int64_t* chunks, int64_t* rows_per_chunk);

template <typename scalar_t, typename acc_t>
void launch_embed_folded_backward(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                                  const scalar_t* table, const scalar_t* weight, acc_t* partial,
                                  acc_t* S, scalar_t* grad_table, scalar_t* grad_weight,
                                  scalar_t* grad_bias, int lanes, int64_t chunks,
                                  int64_t rows_per_chunk, int64_t B, int64_t T, int64_t V,
                                  int64_t E, int64_t H, IndexErrorRecord err, cudaStream_t stream);

// Split planning for launch_embed_grad_weight (host-side arithmetic, in the .cu for
// the tile sizes): returns splits and sets rows_per_split.
int64_t embed_grad_weight_splits(int64_t B, int64_t K, int64_t H, int64_t* rows_per_split);

// ---------------------------------------------------------------------------------------
// cross_entropy (cross_entropy_kernels.cu)
// ---------------------------------------------------------------------------------------

// Rows kernel grid size for B rows.
int ce_forward_blocks(int64_t B);
int ce_backward_blocks(int64_t B, int64_t V);

// lse [B]; reduction none -> loss_rows [B]; else the scalar *loss_final, via
// psum/pcount [blocks] partials when blocks > 1.
template <typename scalar_t, typename acc_t>
void launch_ce_forward(const scalar_t* logits, const int64_t* target, int64_t B, int64_t V,
                       int64_t ignore_index, acc_t eps, int64_t reduction, acc_t* lse,
                       scalar_t* loss_rows, acc_t* psum, long long* pcount, scalar_t* loss_final,
                       int blocks, IndexErrorRecord err, cudaStream_t stream);

// grad [B, V]. grad_loss: acc [B] (none) or [1], null = 1. count_buf: device scratch
// for the mean's count (used when B is large), may be null otherwise.
template <typename scalar_t, typename acc_t>
void launch_ce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* logits,
                        const int64_t* target, const acc_t* lse, int64_t B, int64_t V,
                        int64_t ignore_index, acc_t eps, scalar_t* grad, long long* count_buf,
                        IndexErrorRecord err, cudaStream_t stream);

// True when launch_ce_backward / launch_lce_backward need a count_buf for this B.
bool needs_count_buffer(int64_t reduction, int64_t B, int blocks);

// ---------------------------------------------------------------------------------------
// The kernel tour's naive kernels (embed_linear_tanh_naive.cu, cross_entropy_naive.cu; see
// kernel_impl.h): one thread per output element. Same shapes as the fast ones above.
// ---------------------------------------------------------------------------------------

// out [B, H]; every index checked first; bias may be null.
template <typename scalar_t>
void launch_naive_embed_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                                const scalar_t* bias, scalar_t* out, int64_t B, int64_t T,
                                int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                                cudaStream_t stream);

// grad_table [V, E], grad_weight [H, T*E], grad_bias [H], each element written.
template <typename scalar_t>
void launch_naive_embed_backward(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                                 const scalar_t* table, const scalar_t* weight,
                                 scalar_t* grad_table, scalar_t* grad_weight, scalar_t* grad_bias,
                                 int64_t B, int64_t T, int64_t V, int64_t E, int64_t H,
                                 IndexErrorRecord err, cudaStream_t stream);

// sums [2] (acc): the mean's denominator (sum of the counted rows' class weights: their
// count without weights) and sum_v w[v]. w: class weights [V] (acc) or null for none.
template <typename acc_t>
void launch_naive_ce_sums(const int64_t* target, const acc_t* w, int64_t B, int64_t V,
                          int64_t ignore_index, acc_t* sums, IndexErrorRecord err,
                          cudaStream_t stream);

// lse [B] and row_loss [B] (acc); for sum / mean also the scalar *loss (needs sums).
template <typename scalar_t, typename acc_t>
void launch_naive_ce_forward(const scalar_t* logits, const int64_t* target, const acc_t* w,
                             int64_t B, int64_t V, int64_t ignore_index, acc_t eps,
                             int64_t reduction, const acc_t* sums, acc_t* lse, acc_t* row_loss,
                             scalar_t* loss, IndexErrorRecord err, cudaStream_t stream);

// grad [B, V]. grad_loss: acc [B] (none) or [1], null = 1.
template <typename scalar_t, typename acc_t>
void launch_naive_ce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* logits,
                              const int64_t* target, const acc_t* w, const acc_t* lse,
                              const acc_t* sums, int64_t B, int64_t V, int64_t ignore_index,
                              acc_t eps, scalar_t* grad, IndexErrorRecord err,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// linear_cross_entropy, fused small-vocabulary path (linear_cross_entropy_kernels.cu)
// ---------------------------------------------------------------------------------------

// Whether the fused kernels handle (V, H) for this acc size; their grid size.
bool lce_fused_ok(int64_t V, int64_t H, size_t acc_size, bool backward);
int lce_blocks(int64_t B);

template <typename scalar_t, typename acc_t>
void launch_lce_forward(const scalar_t* input, const scalar_t* weight, const scalar_t* bias,
                        const int64_t* target, int64_t B, int64_t H, int64_t V,
                        int64_t ignore_index, acc_t eps, int64_t reduction, acc_t* lse,
                        scalar_t* loss_rows, acc_t* psum, long long* pcount,
                        scalar_t* loss_final, int blocks, IndexErrorRecord err,
                        cudaStream_t stream);

// grad_input [B, H], grad_weight [V, H], grad_bias [V]; with blocks > 1 through
// partial_w [blocks, V, H] and partial_b [blocks, V] (acc dtype).
template <typename scalar_t, typename acc_t>
void launch_lce_backward(const acc_t* grad_loss, int64_t reduction, const scalar_t* input,
                         const scalar_t* weight, const scalar_t* bias, const int64_t* target,
                         const acc_t* lse, int64_t B, int64_t H, int64_t V, int64_t ignore_index,
                         acc_t eps, scalar_t* grad_input, scalar_t* grad_weight,
                         scalar_t* grad_bias, acc_t* partial_w, acc_t* partial_b,
                         long long* count_buf, int blocks, IndexErrorRecord err,
                         cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// mlp_sgd_step (mlp_sgd_step_kernels.cu)
// ---------------------------------------------------------------------------------------

// Whether the single-block fused step handles these sizes (acc_size = sizeof(acc_t)).
bool sgd_step_fused_ok(int64_t B, int64_t T, int64_t V, int64_t E, int64_t H, size_t acc_size);

// The whole step in one kernel; parameters updated in place, *loss = mean loss before
// the update, in the parameters' dtype like the CPU op (NaN and no update on a bad
// index, or when the record already holds an unreported error).
template <typename scalar_t, typename acc_t>
void launch_sgd_step_fused(const int64_t* idx, const int64_t* target, scalar_t* table,
                           scalar_t* weight1, scalar_t* bias1, scalar_t* weight2,
                           scalar_t* bias2, acc_t lr, int64_t B, int64_t T, int64_t V, int64_t E,
                           int64_t H, scalar_t* loss, IndexErrorRecord err, cudaStream_t stream);

// p[i] -= lr * g[i] for 5 tensors in one launch, skipped when an index error is recorded.
template <typename scalar_t>
struct SgdSegments {
  scalar_t* param[5];
  const scalar_t* grad[5];
  int64_t n[5];
};

template <typename scalar_t, typename acc_t>
void launch_sgd_update(const SgdSegments<scalar_t>& segments, acc_t lr, IndexErrorRecord err,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace charmlp
