// CUDA kernels of mlp_sgd_step (host side: mlp_sgd_step_cuda.cpp): one plain-SGD
// step of the whole model,
//   emb = table[idx] (B x K, K = T*E), h = tanh(emb W1^T + b1), z = h W2^T + b2,
//   loss = mean cross-entropy(z, target) (ignore_index -100), p -= lr * dloss/dp,
// returning the loss before the update.
//
// Small batches (this model's B = 32 at V = 27, H = 200), "fused" path: the whole
// step is ONE kernel launch on ONE block of 1024 threads, everything in shared memory:
//   0. indices: range-checked once into shared memory. Any bad idx/target: the
//      error is recorded, the loss is NaN and NO parameter is touched.
//   1. emb_s[b, k]  = table[idx[b, k / E], k % E]
//   2. h_s[b, j]    = tanh(b1[j] + emb_s[b] . W1[j])
//   3. z[b, v]      = b2[v] + h_s[b] . W2[v]
//   4. per row (one warp, V <= 32 lanes): lse, loss, dz = (softmax - onehot) / count
//   5. p_s[b, j]    = (dz[b] . W2[:, j]) (1 - h_s[b, j]^2)                  (dpre)
//   6. W2 -= lr dz^T h_s, b2 -= lr sum_b dz;  g_s = p_s W1                 (demb, old W1)
//   7. W1 -= lr p_s^T emb_s, b1 -= lr sum_b p_s, table[v] -= lr sum_{idx = v} g_s
// Between phases only __syncthreads; each output element is owned by one thread that
// sums over the batch in a fixed order, so the step is bitwise deterministic without
// atomics. Thread-to-element maps put the batch index on consecutive lanes when a
// parameter is read (the parameter value is then a warp broadcast and the
// shared-memory row strides are odd, so no bank conflicts), and the parameter index
// on consecutive lanes when a parameter is written (coalesced stores).
// One SM does all the work: at B = 32 that is ~2 MFLOP, a few microseconds, far
// below the ~10+ launches of the unfused step. The eager PyTorch step it replaces is
// dominated by launch and autograd overhead.
//
// Larger problems (shared memory exceeded, V > 32, or B > 128) take the general path:
// the embed_linear_tanh and linear_cross_entropy kernels (forward and backward),
// then one multi-tensor SGD kernel that skips the update when any of them recorded
// a bad index.
#include "cuda/device_common.cuh"

namespace charmlp {
namespace cuda {

namespace {

constexpr int64_t kIgnoreIndex = -100;
constexpr int kStepThreads = 1024;
constexpr int64_t kFusedMaxBatch = 128;
// Work limits of the single-block kernel (lecture, B = 32: 3.6e5 MACs, 1.2e4 parameters).
constexpr int64_t kFusedMaxMacs = int64_t{1} << 23;
constexpr int64_t kFusedMaxParams = int64_t{1} << 21;
constexpr int kZStride = kWarp + 1;  // row stride of the logits / dz buffer (odd)

struct StepSmem {
  int64_t Kp, Hp;  // odd row strides
  int64_t emb, h, p, z, g, idx, tgt, total_bytes;  // byte offsets
};

template <typename acc_t>
StepSmem step_smem(int64_t B, int64_t T, int64_t E, int64_t H) {
  StepSmem s{};
  s.Kp = (T * E) | 1;
  s.Hp = H | 1;
  int64_t off = 0;
  s.emb = off;
  off += B * s.Kp * sizeof(acc_t);
  s.h = off;
  off += B * s.Hp * sizeof(acc_t);
  s.p = off;
  off += B * s.Hp * sizeof(acc_t);
  s.z = off;
  off += B * kZStride * sizeof(acc_t);
  s.g = off;
  off += B * s.Kp * sizeof(acc_t);
  s.idx = off;
  off += B * T * sizeof(int32_t);
  s.tgt = off;
  off += B * sizeof(int32_t);
  s.total_bytes = off;
  return s;
}

// idx B x T, target B, table V x E, W1 H x K, b1 H, W2 V x H, b2 V (all contiguous).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    mlp_sgd_step_fused_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ target,
                              scalar_t* __restrict__ table, scalar_t* __restrict__ W1,
                              scalar_t* __restrict__ b1, scalar_t* __restrict__ W2,
                              scalar_t* __restrict__ b2, acc_t lr, int64_t B, int64_t T, int64_t V,
                              int64_t E, int64_t H, StepSmem L, scalar_t* __restrict__ loss_out,
                              IndexErrorRecord err) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* emb_s = reinterpret_cast<acc_t*>(smem_raw + L.emb);  // B x Kp
  acc_t* h_s = reinterpret_cast<acc_t*>(smem_raw + L.h);      // B x Hp
  acc_t* p_s = reinterpret_cast<acc_t*>(smem_raw + L.p);      // B x Hp
  acc_t* z_s = reinterpret_cast<acc_t*>(smem_raw + L.z);      // B x 33
  acc_t* g_s = reinterpret_cast<acc_t*>(smem_raw + L.g);      // B x Kp
  int32_t* idx_s = reinterpret_cast<int32_t*>(smem_raw + L.idx);  // B*T, -1 = bad
  int32_t* tgt_s = reinterpret_cast<int32_t*>(smem_raw + L.tgt);  // B, -1 = ignored/bad
  const int64_t K = T * E, Kp = L.Kp, Hp = L.Hp;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int nthreads = blockDim.x, nwarps = nthreads / kWarp;

  // 0. Indices (B*T and B are at most a few thousand: a strided loop per thread).
  // A bad value is recorded the way the CPU op reports it (checked_indices_cpu): idx
  // before target, the lowest flat position first. s_bad holds the lowest bad
  // position of each (~0 = none); only thread 0 records, after the barrier.
  __shared__ unsigned long long s_bad[2];
  if (tid == 0) s_bad[0] = s_bad[1] = ~0ull;
  __syncthreads();
  for (int64_t i = tid; i < B * T; i += nthreads) {
    const int64_t v = idx[i];
    if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(V)) {
      atomicMin(&s_bad[0], static_cast<unsigned long long>(i));
    }
    idx_s[i] = static_cast<int32_t>(v);  // only used when every value is in range
  }
  int counted = 0;
  for (int64_t b = tid; b < B; b += nthreads) {
    const int64_t t = target[b];
    const bool ignored = t == kIgnoreIndex;
    if (!ignored && static_cast<uint64_t>(t) >= static_cast<uint64_t>(V)) {
      atomicMin(&s_bad[1], static_cast<unsigned long long>(b));
    }
    counted += !ignored;
    tgt_s[b] = ignored ? -1 : static_cast<int32_t>(t);
  }
  __shared__ long long s_scratch_ll[kWarp];
  // block_sum's barriers also publish idx_s, tgt_s and s_bad.
  const long long count = block_sum(static_cast<long long>(counted), s_scratch_ll);
  // An error already in the record (a captured replay or an earlier op not reported
  // yet) also blocks the update, like the general path's SGD kernel: the host raises
  // it from this call, and a call that raises has not touched the parameters. Read by
  // one thread and broadcast so that every thread takes the same branch.
  const bool stale = __syncthreads_or(tid == 0 && index_error_is_set(err));
  if (stale || s_bad[0] != ~0ull || s_bad[1] != ~0ull) {
    if (tid == 0) {
      if (s_bad[0] != ~0ull) {
        const int64_t pos = static_cast<int64_t>(s_bad[0]);
        record_index_error(err, kArgIdx, idx[pos], V, pos);
      } else if (s_bad[1] != ~0ull) {
        const int64_t pos = static_cast<int64_t>(s_bad[1]);
        record_index_error(err, kArgTarget, target[pos], V, pos);
      }
      *loss_out = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    }
    return;  // the host raises; parameters untouched
  }
  const acc_t inv_count = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);

  // 1. Gather the embeddings (k fastest: contiguous table rows).
  for (int64_t o = tid; o < B * K; o += nthreads) {
    const int64_t b = o / K, k = o - b * K, t = k / E, e = k - t * E;
    emb_s[b * Kp + k] = static_cast<acc_t>(table[static_cast<int64_t>(idx_s[b * T + t]) * E + e]);
  }
  __syncthreads();

  // 2. Hidden layer (b fastest: W1[j] is a broadcast, emb_s rows have odd stride).
  for (int64_t o = tid; o < B * H; o += nthreads) {
    const int64_t j = o / B, b = o - j * B;
    const scalar_t* w = W1 + j * K;
    const acc_t* x = emb_s + b * Kp;
    acc_t s = static_cast<acc_t>(b1[j]);
    for (int64_t k = 0; k < K; ++k) s += x[k] * static_cast<acc_t>(w[k]);
    h_s[b * Hp + j] = dev_tanh(s);
  }
  __syncthreads();

  // 3. Logits.
  for (int64_t o = tid; o < B * V; o += nthreads) {
    const int64_t v = o / B, b = o - v * B;
    const scalar_t* w = W2 + v * H;
    const acc_t* x = h_s + b * Hp;
    acc_t s = static_cast<acc_t>(b2[v]);
    for (int64_t j = 0; j < H; ++j) s += x[j] * static_cast<acc_t>(w[j]);
    z_s[b * kZStride + v] = s;
  }
  __syncthreads();

  // 4. Softmax cross-entropy per row: one warp per row, lane v holds z[b, v].
  acc_t my_loss = acc_t(0);
  for (int64_t b = warp; b < B; b += nwarps) {
    const acc_t z = lane < V ? z_s[b * kZStride + lane] : neg_inf<acc_t>();
    const acc_t m = warp_max(z);
    const acc_t lse = m + dev_log(warp_sum(lane < V ? dev_exp(z - m) : acc_t(0)));
    const int t = tgt_s[b];
    const acc_t zt = warp_sum(lane == t ? z : acc_t(0));
    if (lane == 0 && t >= 0) my_loss += lse - zt;
    __syncwarp();  // every lane has read z_s[b] before it is overwritten with dz
    if (lane < V) {
      z_s[b * kZStride + lane] =
          t < 0 ? acc_t(0) : (dev_exp(z - lse) - (lane == t ? acc_t(1) : acc_t(0))) * inv_count;
    }
  }
  __shared__ acc_t s_scratch[kWarp];
  const acc_t loss_sum = block_sum(my_loss, s_scratch);  // also a barrier for dz
  if (tid == 0) {  // count 0: NaN like torch
    *loss_out = static_cast<scalar_t>(loss_sum / static_cast<acc_t>(count));
  }

  // 5. dpre = (dz W2) * (1 - h^2).
  for (int64_t o = tid; o < B * H; o += nthreads) {
    const int64_t j = o / B, b = o - j * B;
    const acc_t* dz = z_s + b * kZStride;
    acc_t s = acc_t(0);
    for (int64_t v = 0; v < V; ++v) s += dz[v] * static_cast<acc_t>(W2[v * H + j]);
    const acc_t hv = h_s[b * Hp + j];
    p_s[b * Hp + j] = s * (acc_t(1) - hv * hv);
  }
  __syncthreads();

  // 6. Output layer update (W2, b2 are not read again) and demb = dpre W1 (old W1).
  for (int64_t o = tid; o < V * H; o += nthreads) {
    const int64_t v = o / H, j = o - v * H;
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < B; ++b) s += z_s[b * kZStride + v] * h_s[b * Hp + j];
    W2[o] = static_cast<scalar_t>(static_cast<acc_t>(W2[o]) - lr * s);
  }
  for (int64_t v = tid; v < V; v += nthreads) {
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < B; ++b) s += z_s[b * kZStride + v];
    b2[v] = static_cast<scalar_t>(static_cast<acc_t>(b2[v]) - lr * s);
  }
  for (int64_t o = tid; o < B * K; o += nthreads) {
    const int64_t k = o / B, b = o - k * B;
    const acc_t* p = p_s + b * Hp;
    acc_t s = acc_t(0);
    for (int64_t j = 0; j < H; ++j) s += p[j] * static_cast<acc_t>(W1[j * K + k]);
    g_s[b * Kp + k] = s;
  }
  __syncthreads();

  // 7. Hidden layer and table updates.
  for (int64_t o = tid; o < H * K; o += nthreads) {
    const int64_t j = o / K, k = o - j * K;
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < B; ++b) s += p_s[b * Hp + j] * emb_s[b * Kp + k];
    W1[o] = static_cast<scalar_t>(static_cast<acc_t>(W1[o]) - lr * s);
  }
  for (int64_t j = tid; j < H; j += nthreads) {
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < B; ++b) s += p_s[b * Hp + j];
    b1[j] = static_cast<scalar_t>(static_cast<acc_t>(b1[j]) - lr * s);
  }
  for (int64_t o = tid; o < V * E; o += nthreads) {
    const int64_t v = o / E, e = o - v * E;
    acc_t s = acc_t(0);
    bool hit = false;
    for (int64_t i = 0; i < B * T; ++i) {
      if (idx_s[i] == v) {
        const int64_t b = i / T, t = i - b * T;
        s += g_s[b * Kp + t * E + e];
        hit = true;
      }
    }
    if (hit) table[o] = static_cast<scalar_t>(static_cast<acc_t>(table[o]) - lr * s);
  }
}

// General path's update: p -= lr * g for up to 5 tensors in one launch (blockIdx.y
// picks the tensor); nothing happens when a bad index was recorded.
template <typename scalar_t, typename acc_t>
__global__ void sgd_update_kernel(SgdSegments<scalar_t> args, acc_t lr, IndexErrorRecord err) {
  if (index_error_is_set(err)) return;
  const int s = blockIdx.y;
  scalar_t* p = args.param[s];
  const scalar_t* g = args.grad[s];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < args.n[s];
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) - lr * static_cast<acc_t>(g[i]));
  }
}

}  // namespace

bool sgd_step_fused_ok(int64_t B, int64_t T, int64_t V, int64_t E, int64_t H, size_t acc_size) {
  const StepSmem L = acc_size == sizeof(double) ? step_smem<double>(B, T, E, H)
                                                : step_smem<float>(B, T, E, H);
  // One block on one SM does every multiply-add and streams every parameter: past a
  // few million of either, the multi-block general path is faster (shared memory alone
  // admits e.g. B = 1 with H = K = 10^4, i.e. 10^8 parameters on one SM).
  const int64_t K = T * E;
  const int64_t macs = std::max<int64_t>(B, 1) * H * (K + V);
  const int64_t params = V * E + H * K + H + V * H + V;
  return B <= kFusedMaxBatch && V <= kWarp && macs <= kFusedMaxMacs &&
         params <= kFusedMaxParams && static_cast<size_t>(L.total_bytes) <= max_dynamic_smem();
}

template <typename scalar_t, typename acc_t>
void launch_sgd_step_fused(const int64_t* idx, const int64_t* target, scalar_t* table,
                           scalar_t* weight1, scalar_t* bias1, scalar_t* weight2,
                           scalar_t* bias2, acc_t lr, int64_t B, int64_t T, int64_t V, int64_t E,
                           int64_t H, scalar_t* loss, IndexErrorRecord err, cudaStream_t stream) {
  const StepSmem L = step_smem<acc_t>(B, T, E, H);
  auto kernel = mlp_sgd_step_fused_kernel<scalar_t, acc_t>;
  const size_t smem = static_cast<size_t>(L.total_bytes);
  set_dynamic_smem(kernel, smem);  // its static scratch (< 2 KiB) is within the reserve
  kernel<<<1, kStepThreads, smem, stream>>>(idx, target, table, weight1, bias1, weight2, bias2, lr,
                                            B, T, V, E, H, L, loss, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_sgd_update(const SgdSegments<scalar_t>& segments, acc_t lr, IndexErrorRecord err,
                       cudaStream_t stream) {
  int64_t most = 0;
  for (int i = 0; i < 5; ++i) most = std::max(most, segments.n[i]);
  if (most == 0) return;
  const dim3 grid(static_cast<unsigned>(grid_for(most, 256, 4LL * num_sms())), 5);
  sgd_update_kernel<scalar_t, acc_t><<<grid, 256, 0, stream>>>(segments, lr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CHARMLP_INSTANTIATE(scalar_t, acc_t)                                                  \
  template void launch_sgd_step_fused<scalar_t, acc_t>(                                      \
      const int64_t*, const int64_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t*,  \
      acc_t, int64_t, int64_t, int64_t, int64_t, int64_t, scalar_t*, IndexErrorRecord,        \
      cudaStream_t);                                                                          \
  template void launch_sgd_update<scalar_t, acc_t>(const SgdSegments<scalar_t>&, acc_t,      \
                                                   IndexErrorRecord, cudaStream_t);
CHARMLP_INSTANTIATE_FLOAT_TYPES(CHARMLP_INSTANTIATE)
#undef CHARMLP_INSTANTIATE

}  // namespace cuda
}  // namespace charmlp
