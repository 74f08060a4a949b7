// Which GEMMs the CPU linear_cross_entropy kernels use, and why.
//
// small:  the fused chunk loop of output_layer.h: 64-row chunks, logits in a cache-resident
//         buffer, the register-blocked small_gemm.h. No call overhead per chunk, so it wins
//         for the character model's head (V = 27: a [64, 200] @ [200, 32] block is a few
//         microseconds) and wherever V * H is small.
// aten:   row blocks of ~8 MB of logits, the three GEMMs through ATen (at::addmm / mm_out:
//         MKL or oneDNN underneath, cache-blocked and multithreaded); only the row softmax
//         is charmlp's. For word-level heads (V in the tens of thousands, H in the hundreds)
//         small_gemm re-reads the whole [V, H] weight for every 64-row chunk from memory,
//         where a BLAS GEMM blocks it for cache: 3x slower at V = 32,000, H = 512.
#pragma once

#include "cpu/capability.h"

#include <cstdint>

namespace charmlp {

enum class OutputGemm : int { kAuto = 0, kSmall = 1, kAten = 2 };

// Process-wide override for tests and benchmarks (charmlp._C._set_output_gemm).
void set_output_gemm(OutputGemm gemm);
OutputGemm get_output_gemm();

}  // namespace charmlp

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// The weight is V * H elements; B rows. Measured forward + backward (2 threads, B = 32 and
// 4,096), which path is faster depends on the vector width the small GEMM has:
//
// AVX-512: at the lecture's head (200 x 27 = 5,400) the small loop wins (1.1-1.3x); from
//   ~16 K on ATen's wins (1.4-2.6x at V = 1,024, 2-7x at V >= 16,383), except at large
//   batches of a head of <= 64 classes, where the chunk loop's logits stay in registers
//   and cache (B = 4,096: H = 1,024, V = 27: 1.08x, V = 64: 1.18x for the small loop), and
//   narrow heads (H = 64, V = 1,024: 0.75x, still 2.4x PyTorch's composition).
// AVX2 and the baseline: half (a quarter) of the FMA width against ATen's GEMMs at the
//   CPU's full width: ATen's is as fast or faster from ~12 K weights at 32 rows and at
//   every head at 4,096 rows (B = 4,096, H = 200: 1.06x at V = 27, 1.2x at V = 64-256,
//   on an AVX2-only MKL), the small loop 1.3x faster at 32 rows of the lecture's head.
// The small-GEMM loop re-reads the whole weight for every 64-row chunk; BLAS blocks it.
#if defined(__AVX512F__)
inline bool aten_gemm_is_faster(int64_t B, int64_t V, int64_t H) {
  if (B >= 1024 && V <= 64) return V * H >= (int64_t{1} << 17);
  return V * H >= (int64_t{1} << 14);
}
#else
inline bool aten_gemm_is_faster(int64_t B, int64_t V, int64_t H) {
  return B >= 1024 || V * H >= 12 * 1024;
}
#endif

inline bool use_aten_gemm(int64_t B, int64_t V, int64_t H) {
  switch (get_output_gemm()) {
    case OutputGemm::kSmall: return false;
    case OutputGemm::kAten: return true;
    case OutputGemm::kAuto: break;
  }
  return aten_gemm_is_faster(B, V, H);
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
