// CUDA kernels of embed_linear_tanh, out = tanh(concat_t table[idx[:, t]] @ W^T + bias).
// Host side (algorithm choice, allocation): embed_linear_tanh_cuda.cpp.
//
// Notation: B rows, T context, V vocabulary, E embedding width, K = T*E, H hidden.
// Two algorithms, as on CPU (cost model in cpu/embed_algorithm.h):
//
// DIRECT (small batches, large vocabularies).
// emb(b, k) = table[idx[b, k / E], k % E] is never materialized: the tiled GEMM
// (tiled_gemm.cuh) gathers it while loading its shared-memory tiles.
// Forward (1 kernel):  out[b, h] = tanh(bias[h] + sum_k emb(b, k) W[h, k])
//   tiled GEMM, M = B, N = H, reduction over K; gather in the A loader, bias and
//   tanh in the epilogue.
// Backward from the saved output (tanh' = 1 - out^2):
//   dpre[b, h] = grad_out[b, h] (1 - out[b, h]^2)      computed on load, never stored
//   grad_W[h, k]  = sum_b dpre[b, h] emb(b, k)
//   grad_bias[h]  = sum_b dpre[b, h]                    = the same GEMM against a column of ones
//   grad_emb[b, k] = sum_h dpre[b, h] W[h, k]
//   grad_table[v, e] = sum_{(b, t): idx[b, t] = v} grad_emb[b, t E + e]
// Kernels: (1) grad_W and grad_bias as one GEMM with M = H, N = K + 1 (column K of
//   the B operand is 1) and the B rows split across blocks; partial sums are added
//   in split order by a second tiny kernel (deterministic, no atomics).
//   (2) grad_emb as a GEMM, M = B, N = K, reduction over H, whose epilogue
//   scatters into grad_table with atomicAdd (default), or, under
//   torch.use_deterministic_algorithms(True), stores grad_emb [B, K] for
//   (3) a sort-free, atomic-free reduction: each block owns a chunk of rows and
//   each thread owns (v, e) entries, scanning the chunk's indices in order, then
//   chunks are summed in order. Cost grows with V*E, so above 4096 entries the
//   deterministic path uses ATen's sort-based index_put_(accumulate=True).
//
// FOLDED (large batches, small vocabularies: the lecture's full batch). The per-row
// work drops from 2 K H flops to T H adds, so the passes over [B, H] become
// memory-bound instead of three GEMMs of 2 B K H flops each. See the section
// "folded algorithm" below; it is deterministic without atomics in both modes.
#include "cuda/device_common.cuh"
#include "cuda/tiled_gemm.cuh"

namespace charmlp {
namespace cuda {

namespace {

// ------------------------------- operand loaders -------------------------------------

// emb(b, k) = table[idx[b, k / E], k % E]; 0 (and an error record) for a bad index.
// idx B x T, table V x E. With kOnes, column k == K reads 1 (the grad_bias column).
template <typename scalar_t, typename acc_t, bool kOnes>
struct GatherEmb {
  const int64_t* idx;
  const scalar_t* table;
  int64_t T, E, V, K;
  IndexErrorRecord err;
  __device__ acc_t operator()(int64_t b, int64_t k) const {
    if (kOnes && k == K) return acc_t(1);
    const int64_t t = k / E, e = k - t * E;
    const int64_t v = load_index(idx, b * T + t, V, err, kArgIdx);
    return v < 0 ? acc_t(0) : static_cast<acc_t>(table[v * E + e]);
  }
};

// operand(m, r) = op(r, m): a loader whose indices come the other way round, e.g. the
// gathered embedding emb(b, k) as grad_W's B operand, which the GEMM reads as (k, b).
template <class Op>
struct Swapped {
  Op op;
  __device__ auto operator()(int64_t m, int64_t r) const { return op(r, m); }
};

// p[m * ld + r]: a row-major matrix read as operand(m, r).
template <typename scalar_t, typename acc_t>
struct RowMajor {
  const scalar_t* p;
  int64_t ld;
  __device__ acc_t operator()(int64_t m, int64_t r) const {
    return static_cast<acc_t>(p[m * ld + r]);
  }
};

// p[r * ld + m]: a row-major matrix read transposed.
template <typename scalar_t, typename acc_t>
struct ColMajor {
  const scalar_t* p;
  int64_t ld;
  __device__ acc_t operator()(int64_t m, int64_t r) const {
    return static_cast<acc_t>(p[r * ld + m]);
  }
};

// dpre[b, h] = grad_out[b, h] * (1 - out[b, h]^2). grad_out, out B x H.
// kTransposed: operand(m = h, r = b), otherwise operand(m = b, r = h).
template <typename scalar_t, typename acc_t, bool kTransposed>
struct Dpre {
  const scalar_t* grad_out;
  const scalar_t* out;
  int64_t H;
  __device__ acc_t operator()(int64_t m, int64_t r) const {
    const int64_t i = kTransposed ? r * H + m : m * H + r;
    const acc_t o = static_cast<acc_t>(out[i]);
    return static_cast<acc_t>(grad_out[i]) * (acc_t(1) - o * o);
  }
};

// ---------------------------------- epilogues ----------------------------------------

// out[b, h] = tanh(acc + bias[h]).  out B x H, bias H or null
template <typename scalar_t, typename acc_t>
struct BiasTanhEpi {
  scalar_t* out;
  const scalar_t* bias;
  int64_t H;
  __device__ void operator()(int64_t b, int64_t h, acc_t acc, int) const {
    if (bias != nullptr) acc += static_cast<acc_t>(bias[h]);
    out[b * H + h] = static_cast<scalar_t>(dev_tanh(acc));
  }
};

// (h, k) of the [H, K + 1] grad_W | grad_bias GEMM: written straight to the outputs
// (one split) or to partial[split, h, k].
template <typename scalar_t, typename acc_t>
struct GradWeightEpi {
  scalar_t* grad_weight;  // H x K
  scalar_t* grad_bias;    // H
  acc_t* partial;         // splits x H x (K + 1), or null for a single split
  int64_t H, K;
  __device__ void operator()(int64_t h, int64_t k, acc_t acc, int split) const {
    if (partial != nullptr) {
      partial[(split * H + h) * (K + 1) + k] = acc;
    } else if (k < K) {
      grad_weight[h * K + k] = static_cast<scalar_t>(acc);
    } else {
      grad_bias[h] = static_cast<scalar_t>(acc);
    }
  }
};

// grad_emb(b, k): atomically added into grad_table_acc[idx[b, k / E], k % E], or
// stored to grad_emb[b, k] (deterministic mode; 0 for a bad index).
template <typename acc_t>
struct ScatterEmbEpi {
  acc_t* grad_table;  // V x E (acc dtype), atomic mode
  acc_t* grad_emb;    // B x K, deterministic mode (then grad_table is null)
  const int64_t* idx;
  int64_t T, E, V, K;
  IndexErrorRecord err;
  __device__ void operator()(int64_t b, int64_t k, acc_t acc, int) const {
    const int64_t t = k / E, e = k - t * E;
    const int64_t v = load_index(idx, b * T + t, V, err, kArgIdx);
    if (grad_table != nullptr) {
      if (v >= 0) atomicAdd(grad_table + v * E + e, acc);
    } else {
      grad_emb[b * K + k] = v >= 0 ? acc : acc_t(0);
    }
  }
};

// grad_weight[h, k] / grad_bias[h] from the split partials, summed in split order.
template <typename scalar_t, typename acc_t>
__global__ void finish_grad_weight_kernel(const acc_t* __restrict__ partial, int64_t splits,
                                          int64_t H, int64_t K, scalar_t* __restrict__ grad_weight,
                                          scalar_t* __restrict__ grad_bias) {
  const int64_t n = H * (K + 1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < splits; ++k) s += partial[k * n + i];
    const int64_t h = i / (K + 1), c = i - h * (K + 1);
    if (c < K) {
      grad_weight[h * K + c] = static_cast<scalar_t>(s);
    } else {
      grad_bias[h] = static_cast<scalar_t>(s);
    }
  }
}

// Deterministic table gradient, stage 1: block c owns rows [c * rows, (c + 1) * rows)
// and writes partial[c, v, e] = sum over its (b, t) with idx[b, t] == v of
// grad_emb[b, t * E + e], scanning positions in order. Each thread owns entries
// (v, e), so there are no atomics and the order is fixed.
//   grad_emb B x K, idx B x T, partial chunks x V x E
template <typename acc_t>
__global__ void table_grad_owned_kernel(const acc_t* __restrict__ grad_emb,
                                        const int64_t* __restrict__ idx, int64_t B, int64_t T,
                                        int64_t E, int64_t V, int64_t rows,
                                        acc_t* __restrict__ partial) {
  extern __shared__ int64_t s_idx[];  // rows * T indices of this chunk
  const int64_t b0 = blockIdx.x * rows;
  const int64_t n = ::min(rows, B - b0) * T;
  for (int64_t p = threadIdx.x; p < n; p += blockDim.x) {
    const int64_t v = idx[b0 * T + p];
    s_idx[p] = static_cast<uint64_t>(v) < static_cast<uint64_t>(V) ? v : -1;  // bad: skipped
  }
  __syncthreads();
  const acc_t* src = grad_emb + b0 * T * E;  // position p's E values start at p * E
  for (int64_t o = threadIdx.x; o < V * E; o += blockDim.x) {
    const int64_t v = o / E, e = o - v * E;
    acc_t s = acc_t(0);
    for (int64_t p = 0; p < n; ++p) {
      if (s_idx[p] == v) s += src[p * E + e];
    }
    partial[blockIdx.x * V * E + o] = s;
  }
}

// ------------------------------- folded algorithm -------------------------------------
// P[j, v, h] = sum_e table[v, e] W[h, j E + e]  ([T, V, H], acc dtype): the forward
// becomes pre[b, h] = bias[h] + sum_j P[j, idx[b, j], h], a memory-bound gather-add.
// The backward reduces dpre by index into S[j, v, h] = sum_{b: idx[b, j] = v} dpre[b, h]
// (row T*V of S is sum_b dpre = grad_bias), and then needs only tiny GEMMs:
//   grad_W[h, j E + e] = sum_v S[j, v, h] table[v, e]
//   grad_table[v, e]   = sum_j sum_h S[j, v, h] W[h, j E + e]

// table[(r mod V), e] as operand(n = e, r): the class index of a (j, v) reduction row.
template <typename scalar_t, typename acc_t>
struct TableByClass {
  const scalar_t* table;
  int64_t V, E;
  __device__ acc_t operator()(int64_t e, int64_t r) const {
    return static_cast<acc_t>(table[(r % V) * E + e]);
  }
};

// table[v, r mod E] as operand(m = v, r) for the fold (r = j E + e).
template <typename scalar_t, typename acc_t>
struct TableRowMod {
  const scalar_t* table;
  int64_t E;
  __device__ acc_t operator()(int64_t v, int64_t r) const {
    return static_cast<acc_t>(table[v * E + r % E]);
  }
};

// S[j, v, h] as operand(m = v, r = j H + h)  (S is [T*V + 1, H]).
template <typename acc_t>
struct SByContext {
  const acc_t* S;
  int64_t V, H;
  __device__ acc_t operator()(int64_t v, int64_t r) const {
    const int64_t j = r / H, h = r - j * H;
    return S[(j * V + v) * H + h];
  }
};

// W[h, j E + e] as operand(n = e, r = j H + h).
template <typename scalar_t, typename acc_t>
struct WeightByContext {
  const scalar_t* W;
  int64_t H, E, K;
  __device__ acc_t operator()(int64_t e, int64_t r) const {
    const int64_t j = r / H, h = r - j * H;
    return static_cast<acc_t>(W[h * K + j * E + e]);
  }
};

// Epilogues: P[j, v, h] (split j); grad_W[h, j E + e] (split j); grad_table[v, e].
template <typename acc_t>
struct FoldEpi {
  acc_t* P;
  int64_t V, H;
  __device__ void operator()(int64_t v, int64_t h, acc_t acc, int j) const {
    P[(j * V + v) * H + h] = acc;
  }
};

template <typename scalar_t, typename acc_t>
struct StridedOutEpi {  // out[m * ld + split * split_stride + n]
  scalar_t* out;
  int64_t ld, split_stride;
  __device__ void operator()(int64_t m, int64_t n, acc_t acc, int split) const {
    out[m * ld + split * split_stride + n] = static_cast<scalar_t>(acc);
  }
};

// out[b, h] = tanh(bias[h] + sum_j P[j, idx[b, j], h]). One thread per output, h fastest
// (coalesced stores; P is small and stays in L1/L2).
template <typename scalar_t, typename acc_t>
__global__ void folded_forward_kernel(const int64_t* __restrict__ idx, const acc_t* __restrict__ P,
                                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                      int64_t B, int64_t T, int64_t V, int64_t H,
                                      IndexErrorRecord err) {
  const int64_t n = B * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, h = i - b * H;
    acc_t s = bias != nullptr ? static_cast<acc_t>(bias[h]) : acc_t(0);
    for (int64_t j = 0; j < T; ++j) {
      const int64_t v = load_index(idx, b * T + j, V, err, kArgIdx);
      if (v >= 0) s += P[(j * V + v) * H + h];
    }
    out[i] = static_cast<scalar_t>(dev_tanh(s));
  }
}

// Stage 1 of S: block (column tile x, row chunk y). Thread (lane l, column c) owns
// column h = 32 x + c and rows b = b0 + l, b0 + l + lanes, ...; it adds dpre[b, h]
// into its private shared-memory column of S (rows j V + idx[b, j] and the bias row
// T V), so no two threads ever write the same address: no atomics. The `lanes`
// private copies are then added in lane order: deterministic.
//   grad_out, out B x H; idx B x T; partial chunks x (T V + 1) x H
template <typename scalar_t, typename acc_t>
__global__ void folded_S_kernel(const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ out, const int64_t* __restrict__ idx,
                                int64_t B, int64_t T, int64_t V, int64_t H, int64_t rows_per_chunk,
                                acc_t* __restrict__ partial, IndexErrorRecord err) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* S_s = reinterpret_cast<acc_t*>(smem_raw);  // lanes x R1 x 32
  const int64_t R1 = T * V + 1;
  const int lanes = blockDim.x / kWarp;
  const int c = threadIdx.x % kWarp, l = threadIdx.x / kWarp;
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kWarp + c;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t b1 = ::min(B, b0 + rows_per_chunk);
  acc_t* mine = S_s + l * R1 * kWarp;
  for (int64_t r = 0; r < R1; ++r) mine[r * kWarp + c] = acc_t(0);
  if (h < H) {
    for (int64_t b = b0 + l; b < b1; b += lanes) {
      const acc_t o = static_cast<acc_t>(out[b * H + h]);
      const acc_t d = static_cast<acc_t>(grad_out[b * H + h]) * (acc_t(1) - o * o);
      mine[(R1 - 1) * kWarp + c] += d;
      for (int64_t j = 0; j < T; ++j) {
        const int64_t v = load_index(idx, b * T + j, V, err, kArgIdx);
        if (v >= 0) mine[(j * V + v) * kWarp + c] += d;
      }
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < R1 * kWarp; e += blockDim.x) {
    const int64_t r = e / kWarp, hh = static_cast<int64_t>(blockIdx.x) * kWarp + (e - r * kWarp);
    if (hh >= H) continue;
    acc_t s = acc_t(0);
    for (int k = 0; k < lanes; ++k) s += S_s[k * R1 * kWarp + e];
    partial[(static_cast<int64_t>(blockIdx.y) * R1 + r) * H + hh] = s;
  }
}

// Stage 2: S = sum of the chunks in chunk order; its last row is grad_bias.
template <typename scalar_t, typename acc_t>
__global__ void folded_S_finish_kernel(const acc_t* __restrict__ partial, int64_t chunks,
                                       int64_t R1, int64_t H, acc_t* __restrict__ S,
                                       scalar_t* __restrict__ grad_bias) {
  const int64_t n = R1 * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * n + i];
    S[i] = s;
    if (i >= (R1 - 1) * H) grad_bias[i - (R1 - 1) * H] = static_cast<scalar_t>(s);
  }
}

}  // namespace

template <typename scalar_t>
void launch_embed_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                          const scalar_t* bias, scalar_t* out, int64_t B, int64_t T, int64_t V,
                          int64_t E, int64_t H, IndexErrorRecord err, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = T * E;
  // No GEMM reads idx when H == 0 or K == 0: check it on its own (out may be null
  // when H == 0: the backward uses this for its H == 0 early return).
  if (B > 0 && (H == 0 || K == 0)) {
    launch_check_index_range(idx, B * T, V, kArgIdx, /*ignore_index=*/-1, err, stream);
  }
  if (B == 0 || H == 0) return;
  GatherEmb<scalar_t, acc_t, false> la{idx, table, T, E, V, K, err};
  RowMajor<scalar_t, acc_t> lb{weight, K};
  BiasTanhEpi<scalar_t, acc_t> epi{out, bias, H};
  tiled_gemm_kernel<acc_t, true, true><<<gemm_grid(B, H, 1), kGemmThreads, 0, stream>>>(
      B, H, K, std::max<int64_t>(K, 1), la, lb, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t embed_grad_weight_splits(int64_t B, int64_t K, int64_t H, int64_t* rows_per_split) {
  const int64_t splits = gemm_splits(H, K + 1, B);
  *rows_per_split = gemm_r_per_split(B, splits);
  return ceil_div<int64_t>(B, *rows_per_split);
}

template <typename scalar_t, typename acc_t>
void launch_embed_grad_weight(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                              const scalar_t* table, scalar_t* grad_weight, scalar_t* grad_bias,
                              acc_t* partial, int64_t splits, int64_t rows_per_split, int64_t B,
                              int64_t T, int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                              cudaStream_t stream) {
  // grad_W | grad_bias = dpre^T @ [emb | 1]: M = H, N = K + 1, reduction over B.
  const int64_t K = T * E;
  if (K == 0) {  // no operand reads idx
    launch_check_index_range(idx, B * T, V, kArgIdx, /*ignore_index=*/-1, err, stream);
  }
  Dpre<scalar_t, acc_t, true> la{grad_out, out, H};
  Swapped<GatherEmb<scalar_t, acc_t, true>> lb{{idx, table, T, E, V, K, err}};  // (k, b)
  GradWeightEpi<scalar_t, acc_t> epi{grad_weight, grad_bias, splits > 1 ? partial : nullptr, H, K};
  tiled_gemm_kernel<acc_t, false, false>
      <<<gemm_grid(H, K + 1, splits), kGemmThreads, 0, stream>>>(H, K + 1, B, rows_per_split, la,
                                                                  lb, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t n = H * (K + 1);
    finish_grad_weight_kernel<scalar_t, acc_t><<<grid_for(n, 256, 4LL * num_sms()), 256, 0, stream>>>(
        partial, splits, H, K, grad_weight, grad_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t>
void launch_embed_grad_emb(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                           const scalar_t* weight, acc_t* grad_table_acc, acc_t* grad_emb,
                           int64_t B, int64_t T, int64_t V, int64_t E, int64_t H,
                           IndexErrorRecord err, cudaStream_t stream) {
  // grad_emb = dpre @ W: M = B, N = K, reduction over H.
  const int64_t K = T * E;
  if (B == 0 || K == 0) return;
  Dpre<scalar_t, acc_t, false> la{grad_out, out, H};
  ColMajor<scalar_t, acc_t> lb{weight, K};  // operand(k, h) = W[h, k]
  ScatterEmbEpi<acc_t> epi{grad_table_acc, grad_emb, idx, T, E, V, K, err};
  tiled_gemm_kernel<acc_t, true, false><<<gemm_grid(B, K, 1), kGemmThreads, 0, stream>>>(
      B, K, H, std::max<int64_t>(H, 1), la, lb, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_table_grad_owned(const acc_t* grad_emb, const int64_t* idx, acc_t* partial,
                             acc_t* grad_table_acc, int64_t rows, int64_t chunks, int64_t B,
                             int64_t T, int64_t V, int64_t E, cudaStream_t stream) {
  if (chunks == 0 || V * E == 0) return;
  const size_t smem = static_cast<size_t>(rows * T) * sizeof(int64_t);
  table_grad_owned_kernel<acc_t><<<static_cast<unsigned>(chunks), 256, smem, stream>>>(
      grad_emb, idx, B, T, E, V, rows, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n = V * E;
  sum_splits_kernel<acc_t, acc_t><<<grid_for(n, 256, 4LL * num_sms()), 256, 0, stream>>>(
      partial, chunks, n, grad_table_acc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Folded forward: P = fold(table, W) (one GEMM launch, the T context positions as
// splits), then the gather-add kernel.  P: T x V x H scratch (acc dtype).
template <typename scalar_t, typename acc_t>
void launch_embed_folded_forward(const int64_t* idx, const scalar_t* table, const scalar_t* weight,
                                 const scalar_t* bias, acc_t* P, scalar_t* out, int64_t B,
                                 int64_t T, int64_t V, int64_t E, int64_t H, IndexErrorRecord err,
                                 cudaStream_t stream) {
  if (B == 0 || H == 0) return;
  const int64_t K = T * E;
  // The host never folds T * E == 0 (the fold GEMM's grid would have T = 0 splits or
  // V = 0 rows: an invalid launch); P is then not read by the gather-add either.
  TORCH_CHECK(T > 0 && V > 0, "charmlp: folded embed_linear_tanh needs T > 0 and V > 0");
  TableRowMod<scalar_t, acc_t> la{table, E};
  RowMajor<scalar_t, acc_t> lb{weight, K};
  FoldEpi<acc_t> epi{P, V, H};
  tiled_gemm_kernel<acc_t, true, true><<<gemm_grid(V, H, T), kGemmThreads, 0, stream>>>(
      V, H, K, E, la, lb, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  folded_forward_kernel<scalar_t, acc_t><<<grid_for(B * H, 256, 16LL * num_sms()), 256, 0, stream>>>(
      idx, P, bias, out, B, T, V, H, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool embed_folded_backward_plan(int64_t B, int64_t T, int64_t V, int64_t H, size_t acc_size,
                                int* lanes, int64_t* chunks, int64_t* rows_per_chunk) {
  // Private S columns per lane: (T V + 1) x 32 values. Up to 4 lanes (128 threads)
  // and 48 KiB, so several blocks share an SM (this kernel is memory bound).
  const size_t per_lane = static_cast<size_t>(T * V + 1) * kWarp * acc_size;
  const size_t budget = std::min<size_t>(48 * 1024, max_dynamic_smem());
  const int fit = static_cast<int>(std::min<size_t>(4, budget / per_lane));
  if (fit < 1 || B == 0 || H == 0) return false;
  *lanes = fit;
  const int64_t tiles = ceil_div<int64_t>(H, kWarp);
  const int64_t want = ceil_div<int64_t>(8LL * num_sms(), tiles);
  *chunks = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div<int64_t>(B, 64), 65535}));
  *rows_per_chunk = ceil_div<int64_t>(B, *chunks);
  *chunks = ceil_div<int64_t>(B, *rows_per_chunk);
  return true;
}

// Folded backward. partial: chunks x (T V + 1) x H, S: (T V + 1) x H (acc scratch).
template <typename scalar_t, typename acc_t>
void launch_embed_folded_backward(const scalar_t* grad_out, const scalar_t* out, const int64_t* idx,
                                  const scalar_t* table, const scalar_t* weight, acc_t* partial,
                                  acc_t* S, scalar_t* grad_table, scalar_t* grad_weight,
                                  scalar_t* grad_bias, int lanes, int64_t chunks,
                                  int64_t rows_per_chunk, int64_t B, int64_t T, int64_t V,
                                  int64_t E, int64_t H, IndexErrorRecord err, cudaStream_t stream) {
  const int64_t R1 = T * V + 1, K = T * E;
  const size_t smem = static_cast<size_t>(lanes) * R1 * kWarp * sizeof(acc_t);
  auto s_kernel = folded_S_kernel<scalar_t, acc_t>;
  set_dynamic_smem(s_kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(H, kWarp)), static_cast<unsigned>(chunks));
  s_kernel<<<grid, lanes * kWarp, smem, stream>>>(grad_out, out, idx, B, T, V, H, rows_per_chunk,
                                                  partial, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  folded_S_finish_kernel<scalar_t, acc_t>
      <<<grid_for(R1 * H, 256, 4LL * num_sms()), 256, 0, stream>>>(partial, chunks, R1, H, S,
                                                                     grad_bias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (K == 0) return;
  // grad_W[h, j E + e] = sum_v S[j, v, h] table[v, e]: M = H, N = E, the T context
  // positions as splits of the (j, v) reduction.
  {
    ColMajor<acc_t, acc_t> la{S, H};  // operand(h, r = j V + v) = S[r, h]
    TableByClass<scalar_t, acc_t> lb{table, V, E};
    StridedOutEpi<scalar_t, acc_t> epi{grad_weight, K, E};
    tiled_gemm_kernel<acc_t, false, false><<<gemm_grid(H, E, T), kGemmThreads, 0, stream>>>(
        H, E, T * V, V, la, lb, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // grad_table[v, e] = sum_{j, h} S[j, v, h] W[h, j E + e]: M = V, N = E, R = T H.
  {
    SByContext<acc_t> la{S, V, H};
    WeightByContext<scalar_t, acc_t> lb{weight, H, E, K};
    StridedOutEpi<scalar_t, acc_t> epi{grad_table, E, 0};
    tiled_gemm_kernel<acc_t, true, false><<<gemm_grid(V, E, 1), kGemmThreads, 0, stream>>>(
        V, E, T * H, T * H, la, lb, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                     \
  template void launch_embed_forward<scalar_t>(const int64_t*, const scalar_t*, const scalar_t*, \
                                               const scalar_t*, scalar_t*, int64_t, int64_t,     \
                                               int64_t, int64_t, int64_t, IndexErrorRecord,      \
                                               cudaStream_t);                                    \
  template void launch_embed_grad_weight<scalar_t, acc_t>(                                      \
      const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*, scalar_t*, scalar_t*,   \
      acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, IndexErrorRecord,   \
      cudaStream_t);                                                                             \
  template void launch_embed_grad_emb<scalar_t, acc_t>(                                         \
      const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*, acc_t*, acc_t*, int64_t, \
      int64_t, int64_t, int64_t, int64_t, IndexErrorRecord, cudaStream_t);                        \
  template void launch_embed_folded_forward<scalar_t, acc_t>(                                   \
      const int64_t*, const scalar_t*, const scalar_t*, const scalar_t*, acc_t*, scalar_t*,       \
      int64_t, int64_t, int64_t, int64_t, int64_t, IndexErrorRecord, cudaStream_t);               \
  template void launch_embed_folded_backward<scalar_t, acc_t>(                                  \
      const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*, const scalar_t*, acc_t*, \
      acc_t*, scalar_t*, scalar_t*, scalar_t*, int, int64_t, int64_t, int64_t, int64_t, int64_t,  \
      int64_t, int64_t, IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

template void launch_table_grad_owned<float>(const float*, const int64_t*, float*, float*, int64_t,
                                             int64_t, int64_t, int64_t, int64_t, int64_t,
                                             cudaStream_t);
template void launch_table_grad_owned<double>(const double*, const int64_t*, double*, double*,
                                              int64_t, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace charmlp
