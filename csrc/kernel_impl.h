// Which implementation the embed_linear_tanh and cross_entropy ops run, on CPU and CUDA:
//
//   fast   (default) the fused, blocked, vectorized kernels: csrc/cpu/*_cpu.cpp and
//          csrc/cuda/*_kernels.cu
//   naive  the kernel tour's first version: plain loops (csrc/cpu/naive/) and one
//          CUDA thread per output (csrc/cuda/*_naive.cu), each readable in one screen
//
// Both take the same arguments, run the same argument and index checks (checks.h,
// index_check.h; on CUDA the checked loads of device_common.cuh) and return the same
// results within rounding. The switch covers the forwards and the backwards autograd
// calls (embed_linear_tanh_backward, cross_entropy_backward, cross_entropy_and_grads);
// the other ops (linear_cross_entropy, the whole-model ops) have no naive version and
// ignore it. Process-wide, read at every call: charmlp.set_kernel_impl() in Python.
#pragma once

namespace charmlp {

enum class KernelImpl : int { kFast = 0, kNaive = 1 };

// Defined in cpu/cpu_dispatch.cpp (the CUDA emulation has its own copy: cuda_emu.cpp).
void set_kernel_impl(KernelImpl impl);
KernelImpl get_kernel_impl();

inline bool use_naive_kernels() { return get_kernel_impl() == KernelImpl::kNaive; }

}  // namespace charmlp
