// Device side of the CUDA emulation: what a .cu file of charmlp's sees instead of
// nvcc's built-ins. Included first by every converted kernel file (build.py).
//
// Emulated threads are fibers (cuda_emu.cpp): the threads of one block run one at a
// time on the calling OS thread and switch only at a barrier (__syncthreads,
// __syncwarp, a shuffle). So atomics need no locking, shared memory is a per-block
// buffer, and a missing barrier shows up as a result that depends on the order in
// which the scheduler runs the threads (tests run several orders).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace cuda_emu {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

ThreadState& this_thread();
[[noreturn]] void fail(const char* what);  // reports a misuse and stops the launch
void* dynamic_shared();                                // the launch's dynamic shared memory
void* block_shared_bytes(const void* site, size_t n);  // a static __shared__ array, per block
void block_barrier();
int block_barrier_or(int predicate);
enum class BarrierKind { kSyncwarp, kShuffleWrite, kShuffleRead };
void warp_barrier(unsigned mask, BarrierKind kind);
// The calling lane's slot in its warp's shuffle exchange, and another lane's.
uint64_t* warp_exchange_slot(int lane);
int lane_id();
int warp_lanes();  // lanes that exist in the calling warp (a partial last warp has fewer)
// Called first thing by a kernel declared with __launch_bounds__(max_threads, ...).
void check_launch_bounds(long long max_threads);

template <class A>
A& block_shared(const void* site) {
  return *static_cast<A*>(block_shared_bytes(site, sizeof(A)));
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::this_thread().thread_idx)
#define blockIdx (::cuda_emu::this_thread().block_idx)
#define blockDim (::cuda_emu::this_thread().block_dim)
#define gridDim (::cuda_emu::this_thread().grid_dim)

inline void __syncthreads() { ::cuda_emu::block_barrier(); }
inline int __syncthreads_or(int predicate) { return ::cuda_emu::block_barrier_or(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emu::warp_barrier(mask, ::cuda_emu::BarrierKind::kSyncwarp);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  const int lane = ::cuda_emu::lane_id();
  if (width != 32 || mask != 0xffffffffu) ::cuda_emu::fail("__shfl_xor_sync: only full-warp shuffles are emulated");
  const unsigned src = static_cast<unsigned>(lane ^ lane_mask);
  if (lane_mask < 0 || src >= static_cast<unsigned>(::cuda_emu::warp_lanes())) {
    ::cuda_emu::fail("__shfl_xor_sync reads a lane that does not exist (undefined on a GPU)");
  }
  std::memcpy(::cuda_emu::warp_exchange_slot(lane), &value, sizeof(T));
  ::cuda_emu::warp_barrier(mask, ::cuda_emu::BarrierKind::kShuffleWrite);
  T out;
  std::memcpy(&out, ::cuda_emu::warp_exchange_slot(static_cast<int>(src)), sizeof(T));
  // Nobody overwrites a slot before every lane has read it.
  ::cuda_emu::warp_barrier(mask, ::cuda_emu::BarrierKind::kShuffleRead);
  return out;
}

// Atomics: emulated threads never run concurrently, so plain read-modify-writes.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  const unsigned long long old = *address;
  if (old == compare) *address = value;
  return old;
}
template <class T>
T atomicMin(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}

// CUDA's device overloads of min/max: fminf/fmaxf semantics for floating point (a NaN
// operand loses), the plain comparison for integers.
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T max(T a, T b) {
  return a < b ? b : a;
}
