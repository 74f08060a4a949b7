// Host side of the CUDA emulation: the subset of the CUDA runtime API that charmlp's
// kernels and host wrappers use, implemented on the CPU. "Device" memory is host
// memory, every call is synchronous on the calling thread, and a kernel launch runs
// the whole grid before it returns (see cuda_emu.cpp for how threads are emulated).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct CUstream_st;
struct CUevent_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorNotReady = 600,
};
enum cudaStreamCaptureStatus : int { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaMemcpyKind : int { cudaMemcpyDeviceToHost = 2 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr unsigned cudaHostAllocDefault = 0;
constexpr unsigned cudaEventDisableTiming = 2;

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The device the emulation pretends to be: an H200 (the GPU the project targets).
// Only the fields charmlp reads.
struct cudaDeviceProp {
  int multiProcessorCount = 132;
  size_t sharedMemPerBlockOptin = 232448;
};

namespace cuda_emu {

const cudaDeviceProp& device_properties();
void set_func_max_dynamic_smem(const void* kernel, int bytes);
// Whether a stream capture is being emulated (cudaStreamIsCapturing answers this).
bool capturing();

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel;
};

// Runs `body` once per emulated thread of every block of the grid.
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <class Kernel>
struct KernelLaunch {
  Kernel kernel;  // calls the kernel with arguments it takes by value (deducing templates)
  LaunchConfig cfg;

  template <class... A>
  void operator()(A&&... a) const {
    // The arguments are evaluated and copied once, as by a CUDA launch; each emulated
    // thread then calls the kernel with its own copies.
    struct Ctx {
      const Kernel* kernel;
      std::tuple<std::decay_t<A>...> args;
    } ctx{&kernel, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
    run_grid(
        cfg, [](void* p) {
          auto* c = static_cast<Ctx*>(p);
          std::apply(*c->kernel, c->args);
        },
        &ctx);
  }
};

// What `k<<<grid, block, smem, stream>>>(args...)` is rewritten into (build.py):
// `::cuda_emu::launch([&](auto... a) { k(a...); }, id, grid, block, smem, stream)(args...)`,
// id being k's address when the launch has dynamic shared memory (for the opt-in check).
template <class Kernel>
KernelLaunch<Kernel> launch(Kernel kernel, const void* id, dim3 grid, dim3 block, size_t smem = 0,
                            cudaStream_t = nullptr) {
  return KernelLaunch<Kernel>{kernel, LaunchConfig{grid, block, smem, id}};
}

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t = nullptr) {
  std::memset(p, value, n);
  return cudaSuccess;
}
// Device-to-host copies land only when the host waits for them (a stream sync, or an
// event query that reports the work done), as on a GPU where the copy runs later:
// host code that reads the destination too early sees stale data here too.
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind,
                            cudaStream_t = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t);
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  *s = cuda_emu::capturing() ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags);
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(uintptr_t{1});
  return cudaSuccess;
}
// An event is "not ready" at its first query after a record, and done at the next.
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t);
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > cuda_emu::device_properties().sharedMemPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  cuda_emu::set_func_max_dynamic_smem(kernel, value);
  return cudaSuccess;
}
template <class T>
cudaError_t cudaGetSymbolAddress(void** p, const T& symbol) {
  *p = const_cast<void*>(static_cast<const void*>(&symbol));
  return cudaSuccess;
}
