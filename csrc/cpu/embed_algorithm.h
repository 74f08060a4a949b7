// Which algorithm the CPU embed_linear_tanh kernels use, and why.
//
// direct:  gather table rows into a tile, GEMM with weight^T (2*B*T*E*H flops
//          forward). Right when the vocabulary is large compared with the batch.
// folded:  P_j = table @ W_j^T ([V, H] per context position j) once per call
//          (2*T*V*E*H flops), then each row is a gather-sum of T rows of P
//          (T*H adds). The embedding width E drops out of the per-row cost, so
//          for this model (V = 27) it is ~E times less work at any sizable batch.
#pragma once

#include "cpu/capability.h"

#include <cstdint>

namespace charmlp {

enum class EmbedAlgorithm : int { kAuto = 0, kDirect = 1, kFolded = 2 };

// Process-wide override for tests and benchmarks (charmlp._C._set_embed_algorithm).
void set_embed_algorithm(EmbedAlgorithm algorithm);
EmbedAlgorithm get_embed_algorithm();

}  // namespace charmlp

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Cost model: folded costs 2*V*E*H*T flops to build P plus ~2 flop-equivalents
// per gather-add (memory bound: ~T*H*2 per row); direct costs 2*E*T*H per row.
// fixed_cost_scale weighs the per-call costs against the per-row ones for callers
// whose folded path has more of them, or runs them on fewer threads than the rows
// (the whole-model step, mlp_cpu.cpp).
inline bool use_folded(int64_t B, int64_t T, int64_t V, int64_t E, int64_t H,
                       int64_t fixed_cost_scale = 1) {
  switch (get_embed_algorithm()) {
    case EmbedAlgorithm::kDirect: return false;
    case EmbedAlgorithm::kFolded: return true;
    case EmbedAlgorithm::kAuto: break;
  }
  (void)T;
  (void)H;
  return fixed_cost_scale * V * E + 2 * B < B * E;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
