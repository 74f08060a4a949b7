// Runtime instruction-set dispatch of the CPU kernels, and the process-wide switches
// their cost models read. Compiled for the baseline target like the rest of the
// library outside the kernels, so it runs on any CPU the library can be loaded on.
//
// Each op's CPU registration is a trampoline that calls the active capability's kernel
// through its table (one relaxed atomic load and an indirect call, ~1 ns, against the
// dispatcher's ~1 us). The choice is made once, at first use, from the CPU's features
// (CPUID and the OS's saved vector state, through __builtin_cpu_supports), and can be
// changed at any time between calls: the tests run every op under every capability the
// host has, in one process.
//
// The ops with a naive version (kernel_impl.h: embed_linear_tanh, cross_entropy and their
// backwards) check that switch first, in the same trampoline. The naive kernels are not in
// the capability tables: they are plain scalar loops, compiled once with the library's
// baseline flags (cpu/naive/), so there is nothing for an instruction set to change. They
// run the same argument and index checks as the fast kernels before their loops.
#include "cpu/cpu_dispatch.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <atomic>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/context_grouping.h"
#include "cpu/embed_algorithm.h"
#include "cpu/kernels.h"
#include "cpu/naive/naive_cpu.h"
#include "cpu/output_gemm.h"
#include "kernel_impl.h"

namespace charmlp {

#ifdef CHARMLP_CPU_HAVE_AVX2
namespace cpu_avx2 {
const CpuKernels& kernel_table();
}
#endif
#ifdef CHARMLP_CPU_HAVE_AVX512
namespace cpu_avx512 {
const CpuKernels& kernel_table();
}
#endif

namespace {

struct Capability {
  std::string name;
  bool runs_here;
  const CpuKernels* kernels;
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// __builtin_cpu_init: these may run from a static constructor, before libgcc's own.
[[maybe_unused]] bool runs_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
[[maybe_unused]] bool runs_avx512() {
  __builtin_cpu_init();
  return runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#else
[[maybe_unused]] bool runs_avx2() { return false; }
[[maybe_unused]] bool runs_avx512() { return false; }
#endif

// Baseline first: the best supported one is the last supported one.
const std::vector<Capability>& capabilities() {
  static const std::vector<Capability> all{
      {"default", true, &cpu_default::kernel_table()},
#ifdef CHARMLP_CPU_HAVE_AVX2
      {"avx2", runs_avx2(), &cpu_avx2::kernel_table()},
#endif
#ifdef CHARMLP_CPU_HAVE_AVX512
      {"avx512", runs_avx512(), &cpu_avx512::kernel_table()},
#endif
  };
  return all;
}

const Capability& best_capability() {
  const Capability* best = nullptr;
  for (const Capability& c : capabilities()) {
    if (c.runs_here) best = &c;
  }
  return *best;
}

std::atomic<const Capability*> g_active{nullptr};

const Capability& active_capability() {
  const Capability* c = g_active.load(std::memory_order_relaxed);
  if (c == nullptr) {
    c = &best_capability();
    g_active.store(c, std::memory_order_relaxed);
  }
  return *c;
}

// The naive kernel of an op (kernel_impl.h), or none.
template <auto Kernel>
struct NaiveKernel {
  static constexpr std::nullptr_t fn = nullptr;
};
#define CHARMLP_NAIVE_CPU_KERNEL_ENTRY(op)                                                \
  template <>                                                                             \
  struct NaiveKernel<&CpuKernels::op> {                                                   \
    static constexpr auto fn = &naive::op##_naive_cpu;                                    \
    static_assert(std::is_same_v<decltype(fn), decltype(CpuKernels::op) const>);          \
  };
CHARMLP_FOR_EACH_NAIVE_CPU_OP(CHARMLP_NAIVE_CPU_KERNEL_ENTRY)
#undef CHARMLP_NAIVE_CPU_KERNEL_ENTRY

// The registered CPU kernel of op: forwards to the active capability's, or to the naive
// kernel when the op has one and charmlp.set_kernel_impl("naive") chose it.
template <auto Kernel>
struct Dispatched;
template <typename R, typename... Args, R (*CpuKernels::*Kernel)(Args...)>
struct Dispatched<Kernel> {
  static R call(Args... args) {
    if constexpr (NaiveKernel<Kernel>::fn != nullptr) {
      if (use_naive_kernels()) return NaiveKernel<Kernel>::fn(args...);
    }
    return (active_capability().kernels->*Kernel)(args...);
  }
};

std::atomic<int> g_embed_algorithm{static_cast<int>(EmbedAlgorithm::kAuto)};
std::atomic<int> g_output_gemm{static_cast<int>(OutputGemm::kAuto)};
std::atomic<bool> g_context_grouping{true};
std::atomic<int> g_kernel_impl{static_cast<int>(KernelImpl::kFast)};

}  // namespace

std::vector<std::string> compiled_cpu_capabilities() {
  std::vector<std::string> out;
  for (const Capability& c : capabilities()) out.push_back(c.name);
  return out;
}

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> out;
  for (const Capability& c : capabilities()) {
    if (c.runs_here) out.push_back(c.name);
  }
  return out;
}

std::string cpu_capability() { return active_capability().name; }

void set_cpu_capability(const std::string& name) {
  std::string compiled;
  for (const Capability& c : capabilities()) {
    compiled += (compiled.empty() ? "'" : ", '") + c.name + "'";
    if (c.name != name) continue;
    TORCH_CHECK_VALUE(c.runs_here, "charmlp: CPU capability '", name,
                      "' is not supported by this CPU (it runs: ",
                      c10::Join(", ", supported_cpu_capabilities()), ")");
    g_active.store(&c, std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK_VALUE(false, "charmlp: CPU capability must be one of ", compiled,
                    " (the ones this build compiled), got '", name, "'");
}

void set_embed_algorithm(EmbedAlgorithm algorithm) {
  g_embed_algorithm.store(static_cast<int>(algorithm));
}
EmbedAlgorithm get_embed_algorithm() {
  return static_cast<EmbedAlgorithm>(g_embed_algorithm.load());
}
void set_output_gemm(OutputGemm gemm) { g_output_gemm.store(static_cast<int>(gemm)); }
OutputGemm get_output_gemm() { return static_cast<OutputGemm>(g_output_gemm.load()); }
void set_context_grouping(bool enabled) { g_context_grouping.store(enabled); }
bool get_context_grouping() { return g_context_grouping.load(); }
void set_kernel_impl(KernelImpl impl) { g_kernel_impl.store(static_cast<int>(impl)); }
KernelImpl get_kernel_impl() {
  return static_cast<KernelImpl>(g_kernel_impl.load(std::memory_order_relaxed));
}

TORCH_LIBRARY_IMPL(charmlp, CPU, m) {
#define CHARMLP_REGISTER_CPU_KERNEL(op) m.impl(#op, &Dispatched<&CpuKernels::op>::call);
  CHARMLP_FOR_EACH_CPU_OP(CHARMLP_REGISTER_CPU_KERNEL)
#undef CHARMLP_REGISTER_CPU_KERNEL
}

}  // namespace charmlp
