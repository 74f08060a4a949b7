// Host-side runtime state of the CUDA kernels: the index-error record (below) and
// the per-device launch helpers declared in kernels.h.
//
// Surfacing out-of-range indices found by CUDA kernels as Python exceptions.
//
// Design: every kernel that reads idx/target checks each value against its bound
// (load_index/load_target in device_common.cuh). A bad value is never dereferenced:
// the kernel treats it as contributing nothing and records (value, position,
// bound, argument) in a small per-device record that lives in global memory for
// the life of the process. So memory is never corrupted, whatever the mode.
//
// When is the record turned into an exception? Reading it on the host needs the
// kernels to have finished, i.e. a synchronization. Two modes, chosen once per
// process by the environment variable CHARMLP_CUDA_INDEX_CHECK:
//
//   sync (default)  After each op, copy the 32-byte record to the host and
//                   synchronize the current stream; raise IndexError at the very
//                   call that had the bad index, with the same message as on CPU.
//                   Cost: one stream sync per op (~5-10 us of lost CPU/GPU
//                   overlap). That is the price of an exact, immediate error.
//   async           No synchronization: after each op the record is copied into
//                   pinned host memory behind an event; a later charmlp op on the
//                   same device polls the event and raises if the record was set.
//                   The error surfaces one or more ops late, but the hot path
//                   never blocks.
//
// While the current stream is being captured into a CUDA graph no host work is
// possible: the check is skipped and the record stays set on the device, so the
// first charmlp op run outside the capture (e.g. after a graph replay with bad
// indices) reports it. mlp_sgd_step's parameter update reads the record on the
// device and skips the update when it is set, so a captured step with bad indices
// leaves the parameters untouched.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "checks.h"
#include "cuda/kernels.h"

namespace charmlp {
namespace cuda {

namespace {

constexpr int kMaxDevices = 64;

struct DeviceState {
  std::once_flag once;
  unsigned long long* slot = nullptr;  // device address of the record (index_record.cu)
  unsigned long long* host = nullptr;  // pinned staging copy of the record, 4 entries
  cudaEvent_t event = nullptr;         // async mode: marks when `host` is up to date
  bool pending = false;                // async mode: a copy is in flight
  std::mutex mutex;
};

std::array<DeviceState, kMaxDevices> g_states;

bool async_mode() {
  static const bool async = [] {
    const char* env = std::getenv("CHARMLP_CUDA_INDEX_CHECK");
    if (env == nullptr || std::strcmp(env, "") == 0 || std::strcmp(env, "sync") == 0) return false;
    TORCH_CHECK_VALUE(std::strcmp(env, "async") == 0,
                      "charmlp: CHARMLP_CUDA_INDEX_CHECK must be 'sync' or 'async', got '", env, "'");
    return true;
  }();
  return async;
}

DeviceState& state() {
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "charmlp: CUDA device index ", device,
              " is beyond the ", kMaxDevices, " devices charmlp supports");
  DeviceState& s = g_states[device];
  std::call_once(s.once, [&] {
    s.slot = index_error_slot_address();  // index_record.cu
  });
  return s;
}

[[noreturn]] void raise_from(const unsigned long long* rec) {
  const int64_t value = static_cast<int64_t>(rec[1]);
  const int64_t position = static_cast<int64_t>(rec[2]);
  const int64_t bound = static_cast<int64_t>(rec[3] >> 8);
  const char* name = (rec[3] & 0xff) == kArgTarget ? "target" : "idx";
  throw_index_out_of_range(name, value, bound, position);
}

}  // namespace

IndexErrorRecord index_error_record() { return IndexErrorRecord{state().slot}; }

void check_index_errors() {
  DeviceState& s = state();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // reported after the capture

  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.host == nullptr) {  // first check outside a capture: pinned staging buffer
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&s.host), 4 * sizeof(unsigned long long),
                                 cudaHostAllocDefault));
    std::memset(s.host, 0, 4 * sizeof(unsigned long long));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming));
  }

  if (!async_mode()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(s.host, s.slot, 4 * sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (s.host[0] != 0ull) {
      unsigned long long rec[4];
      std::memcpy(rec, s.host, sizeof(rec));
      C10_CUDA_CHECK(cudaMemsetAsync(s.slot, 0, sizeof(rec), stream));
      raise_from(rec);
    }
    return;
  }

  if (s.pending) {
    const cudaError_t q = cudaEventQuery(s.event);
    if (q == cudaSuccess) {
      s.pending = false;
      if (s.host[0] != 0ull) {
        unsigned long long rec[4];
        std::memcpy(rec, s.host, sizeof(rec));
        std::memset(s.host, 0, sizeof(rec));
        C10_CUDA_CHECK(cudaMemsetAsync(s.slot, 0, sizeof(rec), stream));
        raise_from(rec);
      }
    } else if (q != cudaErrorNotReady) {
      C10_CUDA_CHECK(q);
    } else {
      (void)cudaGetLastError();  // cudaErrorNotReady is not sticky, but clear it anyway
    }
  }
  if (!s.pending) {
    C10_CUDA_CHECK(cudaMemcpyAsync(s.host, s.slot, 4 * sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaEventRecord(s.event, stream));
    s.pending = true;
  }
}

void set_dynamic_smem_impl(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> done;  // largest size set so far
  const std::pair<int, const void*> key{c10::cuda::current_device(), kernel};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = done.find(key);
  if (it != done.end() && it->second >= bytes) return;
  TORCH_CHECK(bytes <= max_dynamic_smem(), "charmlp: a kernel needs ", bytes,
              " bytes of shared memory, more than this GPU's ", max_dynamic_smem());
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  done[key] = bytes;
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

size_t max_dynamic_smem() {
  // Keep 2 KiB for the kernels' static __shared__ scratch (reductions), which counts
  // against the same per-block limit as the dynamic allocation.
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  return optin > 2048 ? optin - 2048 : 0;
}

}  // namespace cuda
}  // namespace charmlp
