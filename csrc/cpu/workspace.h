// Per-thread scratch memory for the fused CPU kernels, reused across calls.
//
// A training step calls the fused kernels thousands of times with the same
// shapes; allocating and zero-filling their buffers on every call (std::vector)
// was a visible share of a batch-32 step. Each thread (the caller and every
// OpenMP worker, which persist) keeps its buffers, grown on demand and never
// zeroed unless asked.
#pragma once

#include "cpu/capability.h"

#include <ATen/Parallel.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Buffer roles: a kernel uses distinct roles for buffers alive at the same time
// on the same thread (the caller is also worker 0 inside at::parallel_for).
enum class Scratch : int {
  kSharedA = 0,   // caller: read-only operands shared by all workers (e.g. W1^T)
  kSharedB,       // caller: second shared operand (e.g. P)
  kSharedC,       // caller: third shared operand (e.g. W2^T)
  kSharedD,       // caller: reduced gradients
  kSharedE,       // caller: the distinct contexts' logits (written by the workers)
  kChunkA,        // worker: chunk activations
  kChunkB,        // worker: chunk gradients
  kChunkC,        // worker: chunk logits and row statistics
  kChunkD,        // worker: chunk embeddings and their gradients
  kPartial,       // worker: per-thread gradient accumulators
  kCount
};

template <typename T>
T* thread_scratch(Scratch role, int64_t n) {
  thread_local std::vector<T> buffers[static_cast<int>(Scratch::kCount)];
  auto& b = buffers[static_cast<int>(role)];
  if (b.size() < static_cast<size_t>(n)) b.resize(static_cast<size_t>(n));
  return b.data();
}

// Per-thread gradient accumulators, zeroed on a thread's first use in this call
// and summed in thread order afterwards, so results are bitwise reproducible
// for a given thread count.
template <typename T>
class ThreadPartials {
 public:
  explicit ThreadPartials(int64_t size) : size_(size), slots_(at::get_num_threads(), nullptr) {}
  T* slot() {
    T*& s = slots_[at::get_thread_num()];
    if (!s) {
      s = thread_scratch<T>(Scratch::kPartial, size_);
      std::fill_n(s, size_, T(0));
    }
    return s;
  }
  // The sum of every used slot, in thread order: written to out, or, when a
  // single thread did all the work (small batches), that thread's slot itself.
  const T* reduce(T* out) const {
    const T* only = nullptr;
    int used = 0;
    for (const T* s : slots_) {
      if (s) {
        only = s;
        ++used;
      }
    }
    if (used == 1) return only;
    std::fill_n(out, size_, T(0));
    for (const T* s : slots_) {
      if (!s) continue;
#pragma omp simd
      for (int64_t i = 0; i < size_; ++i) out[i] += s[i];
    }
    return out;
  }

 private:
  int64_t size_;
  std::vector<T*> slots_;
};

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
