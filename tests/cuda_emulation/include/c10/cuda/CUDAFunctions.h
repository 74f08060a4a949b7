// CUDA emulation (tests/cuda_emulation): one device, index 0.
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace cuda
}  // namespace c10
