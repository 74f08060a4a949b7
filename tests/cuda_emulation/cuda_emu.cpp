// The CUDA emulation's runtime: runs a kernel's grid on the CPU, one fiber per CUDA
// thread, and checks what a GPU would not forgive.
//
// Scheduling. The blocks of a grid run one after another. Within a block every
// thread is a fiber with its own stack (a dozen instructions of x86-64 assembly
// switch between them: ucontext's swapcontext makes a system call per switch, and
// a shuffle-heavy kernel switches tens of times per thread); the scheduler runs each runnable
// fiber until it reaches a barrier or returns, warp by warp (see run_block), in an
// order chosen by the schedule (forward, reverse or a seeded shuffle), and releases a
// barrier once every thread it waits for has arrived. A shuffle is two warp barriers
// around an exchange.
//
// What is checked (a launch that breaks a rule raises RuntimeError):
//  * launch shape: 1..1024 threads per block, grid and block dimension limits;
//  * shared memory: dynamic + static bytes within 48 KiB unless the kernel opted in
//    (cudaFuncSetAttribute) to at least its dynamic size, and never above the
//    device's opt-in maximum;
//  * barrier divergence: a __syncthreads some threads never reach, a warp barrier
//    or shuffle with lanes missing (exited or waiting elsewhere): a deadlock here;
//  * uninitialized shared memory: every shared buffer starts filled with 0xFF bytes
//    (NaN as floating point, -1 as integers), so reading before writing shows up.
// What is not: memory-model subtleties (threads never run concurrently), register
// and occupancy limits, timing, anything about real hardware numerics (the host's
// libm computes exp/log/tanh).
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/embed_algorithm.h"
#include "cuda_emu_device.h"
#include "kernel_impl.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone, kFailed };

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif
// cuda_emu_switch(&save, to): pushes the callee-saved registers and the SSE/x87
// control words on the current stack, stores its stack pointer in *save, and resumes
// the stack `to` (which was left the same way, or prepared by new_fiber_stack).
extern "C" void cuda_emu_switch(void** save, void* to);
asm(R"(
.pushsection .text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
.popsection
)");

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  ThreadState ts;
  State state = State::kRunnable;
  int linear = 0;
  int predicate = 0;
  int barrier_result = 0;
  BarrierKind kind = BarrierKind::kSyncwarp;  // which warp barrier it waits at
};

// mmap'd stacks with a PROT_NONE guard page below each: an overflow faults at once
// instead of corrupting a neighbour.
struct Stack {
  char* base = nullptr;
  Stack() {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
    base = static_cast<char*>(p);
    mprotect(base, kGuardBytes, PROT_NONE);
  }
  ~Stack() { munmap(base, kStackBytes + kGuardBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
};

struct BlockState {
  std::vector<std::unique_ptr<Fiber>> fibers;
  int nthreads = 0;
  std::vector<std::array<uint64_t, 32>> exchange;  // per warp
  std::map<const void*, std::unique_ptr<unsigned char[]>> shared;
  size_t static_bytes = 0;
  std::unique_ptr<unsigned char[]> dynamic;
};

std::mutex g_launch_mutex;  // one grid at a time (the fibers' globals below)
void* g_main_sp = nullptr;
Fiber* g_current = nullptr;
BlockState* g_block = nullptr;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
std::string g_failure;
std::vector<std::unique_ptr<Stack>> g_stacks;

std::map<const void*, int> g_opt_in;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
std::atomic<int64_t> g_schedule{0};   // 0 forward, 1 reverse, >= 2 shuffled with that seed
std::atomic<bool> g_capturing{false};
std::atomic<int64_t> g_launches{0};
std::atomic<int64_t> g_threads_run{0};

[[noreturn]] void raise(const std::string& what) { TORCH_CHECK(false, "CUDA emulation: ", what); }

// AddressSanitizer builds (build.py's sanitize=True) must be told about every stack
// switch, or they take the fiber stacks for overflows of the main one.
#if defined(__SANITIZE_ADDRESS__)
const void* g_main_stack_bottom = nullptr;
size_t g_main_stack_size = 0;
#endif

// Called on a fiber's stack once it runs (again): fake_stack is what ASan handed out
// when this fiber last switched away (null on its first run).
void arrived_on_fiber(void* fake_stack) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, &g_main_stack_bottom, &g_main_stack_size);
#else
  (void)fake_stack;
#endif
}

void switch_to_main(bool finished = false) {
  void* fake_stack = nullptr;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, g_main_stack_bottom,
                                 g_main_stack_size);
#else
  (void)finished;
#endif
  cuda_emu_switch(&g_current->sp, g_main_sp);
  arrived_on_fiber(fake_stack);
}

[[noreturn]] void fiber_entry() {
  arrived_on_fiber(nullptr);
  try {
    g_body(g_body_ctx);
    g_current->state = State::kDone;
  } catch (const std::exception& e) {  // cannot unwind past this frame: report instead
    g_failure = std::string("a kernel threw: ") + e.what();
    g_current->state = State::kFailed;
  }
  switch_to_main(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

// A fresh stack laid out as cuda_emu_switch leaves one, so that switching to it
// "returns" into fiber_entry with the ABI's stack alignment.
void* new_fiber_stack(char* base, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  // The stack's previous fiber may have left poisoned frames (red zones) behind.
  __asan_unpoison_memory_region(base, size);
#endif
  auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
  auto* w = reinterpret_cast<uint64_t*>(top);
  w[-1] = 0;                                          // fiber_entry's return address (never used)
  w[-2] = reinterpret_cast<uint64_t>(&fiber_entry);   // popped by cuda_emu_switch's ret
  for (int i = 3; i <= 8; ++i) w[-i] = 0;             // rbp rbx r12 r13 r14 r15
  w[-9] = 0x1F80ull | (0x037Full << 32);              // default MXCSR and x87 control word
  return &w[-9];
}

std::string describe(const Fiber& f) {
  return "thread (" + std::to_string(f.ts.thread_idx.x) + "," + std::to_string(f.ts.thread_idx.y) +
         "," + std::to_string(f.ts.thread_idx.z) + ") of block (" +
         std::to_string(f.ts.block_idx.x) + "," + std::to_string(f.ts.block_idx.y) + "," +
         std::to_string(f.ts.block_idx.z) + ")";
}

std::vector<int> schedule_order(int n, int64_t block_linear) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  const int64_t s = g_schedule.load();
  if (s == 1) {
    std::reverse(order.begin(), order.end());
  } else if (s >= 2) {
    std::mt19937_64 rng(static_cast<uint64_t>(s) * 1000003u + static_cast<uint64_t>(block_linear));
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// Releases warp w's lanes when every live one waits at a warp barrier; true if it did.
bool release_warp(BlockState& b, int w) {
  const int first = w * 32, last = std::min(b.nthreads, first + 32);
  int waiting = 0, done = 0;
  for (int i = first; i < last; ++i) {
    waiting += b.fibers[i]->state == State::kAtWarpBarrier;
    done += b.fibers[i]->state == State::kDone;
  }
  if (waiting == 0 || waiting + done != last - first) return false;
  const Fiber* some_waiter = nullptr;
  for (int i = first; i < last && some_waiter == nullptr; ++i) {
    if (b.fibers[i]->state == State::kAtWarpBarrier) some_waiter = b.fibers[i].get();
  }
  for (int i = first; i < last; ++i) {
    if (b.fibers[i]->state == State::kAtWarpBarrier && b.fibers[i]->kind != some_waiter->kind) {
      raise("lanes of warp " + std::to_string(w) + " of " + describe(*b.fibers[first]) +
            "'s block meet at different warp barriers (a __syncwarp against a shuffle, or "
            "shuffles out of step)");
    }
  }
  if (done > 0) {
    raise("a warp barrier or shuffle (full mask) in warp " + std::to_string(w) + " of " +
          describe(*b.fibers[first]) + "'s block is missing " + std::to_string(done) +
          " lane(s) that already returned");
  }
  for (int i = first; i < last; ++i) b.fibers[i]->state = State::kRunnable;
  return true;
}

// Releases the block barrier when every live thread waits at it; true if it did.
bool release_block(BlockState& b) {
  int at_block = 0, done = 0, any = 0;
  for (auto& f : b.fibers) {
    at_block += f->state == State::kAtBlockBarrier;
    done += f->state == State::kDone;
    if (f->state == State::kAtBlockBarrier) any |= f->predicate != 0;
  }
  if (at_block == 0 || at_block + done != b.nthreads) return false;
  for (auto& f : b.fibers) {
    if (f->state == State::kAtBlockBarrier) {
      f->state = State::kRunnable;
      f->barrier_result = any;
    }
  }
  return true;
}

// The most static shared memory any block of a kernel has allocated so far (keyed by the
// launch's body, one per kernel instantiation): CUDA reserves a kernel's static
// __shared__ whether or not a given block reaches the declaration.
std::map<void (*)(void*), size_t> g_static_smem;

void run_block(const LaunchConfig& cfg, uint3 block_idx, int64_t block_linear, size_t smem_limit) {
  const int nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  BlockState b;
  b.nthreads = nthreads;
  b.exchange.resize((nthreads + 31) / 32);
  if (cfg.dynamic_smem > 0) {
    b.dynamic.reset(new unsigned char[cfg.dynamic_smem]);
    std::memset(b.dynamic.get(), 0xFF, cfg.dynamic_smem);
  }
  while (static_cast<int>(g_stacks.size()) < nthreads) g_stacks.push_back(std::make_unique<Stack>());
  for (int i = 0; i < nthreads; ++i) {
    auto f = std::make_unique<Fiber>();
    f->linear = i;
    f->ts.thread_idx = uint3{static_cast<unsigned>(i) % cfg.block.x,
                             (static_cast<unsigned>(i) / cfg.block.x) % cfg.block.y,
                             static_cast<unsigned>(i) / (cfg.block.x * cfg.block.y)};
    f->ts.block_idx = block_idx;
    f->ts.block_dim = cfg.block;
    f->ts.grid_dim = cfg.grid;
    f->sp = new_fiber_stack(g_stacks[i]->base + kGuardBytes, kStackBytes);
    b.fibers.push_back(std::move(f));
  }
  g_block = &b;
  struct ClearBlock {
    ~ClearBlock() { g_block = nullptr; }
  } clear_block;  // also when a check below raises
  // Each warp in turn runs as far as it can (through its warp barriers and shuffles, up
  // to a __syncthreads or its end) before the next warp starts, as warps may on a GPU:
  // a warp racing ahead into the next phase exposes a missing block barrier. The
  // schedule sets the order of the warps and of the lanes within each warp.
  const int nwarps = (nthreads + 31) / 32;
  std::vector<int> warp_order = schedule_order(nwarps, block_linear);
  int64_t phase = 0;  // block barriers passed: a shuffled schedule reorders the warps at each
  std::vector<std::vector<int>> lane_order(nwarps);
  for (int w = 0; w < nwarps; ++w) {
    lane_order[w] = schedule_order(std::min(32, nthreads - 32 * w), block_linear * 64 + w);
  }
  while (true) {
    for (int w : warp_order) {
      do {
        for (int lane : lane_order[w]) {
          Fiber& f = *b.fibers[32 * w + lane];
          if (f.state != State::kRunnable) continue;
          g_current = &f;
#if defined(__SANITIZE_ADDRESS__)
          void* fake_stack = nullptr;
          __sanitizer_start_switch_fiber(&fake_stack, g_stacks[32 * w + lane]->base + kGuardBytes,
                                         kStackBytes);
          cuda_emu_switch(&g_main_sp, f.sp);
          __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
          cuda_emu_switch(&g_main_sp, f.sp);
#endif
          g_current = nullptr;
          if (f.state == State::kFailed) raise(g_failure + " (" + describe(f) + ")");
        }
      } while (release_warp(b, w));
    }
    bool all_done = true;
    for (auto& f : b.fibers) all_done &= f->state == State::kDone;
    if (all_done) break;
    if (!release_block(b)) {
      std::string where;
      for (auto& f : b.fibers) {
        if (f->state == State::kAtBlockBarrier || f->state == State::kAtWarpBarrier) {
          where = describe(*f) + (f->state == State::kAtBlockBarrier ? " waits at __syncthreads"
                                                                     : " waits at a warp barrier");
          break;
        }
      }
      raise("barrier divergence, the block can never finish: " + where +
            " that other threads of its block or warp never reach");
    }
    if (g_schedule.load() >= 2) warp_order = schedule_order(nwarps, block_linear * 4099 + ++phase);
  }
  g_threads_run += nthreads;
  size_t& kernel_static = g_static_smem[g_body];
  kernel_static = std::max(kernel_static, b.static_bytes);
  const size_t total = kernel_static + cfg.dynamic_smem;
  if (total > smem_limit) {
    raise("a block uses " + std::to_string(kernel_static) + " bytes of static and " +
          std::to_string(cfg.dynamic_smem) + " of dynamic shared memory, over the " +
          std::to_string(smem_limit) + " this launch may use");
  }
}

}  // namespace

const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp props;
  return props;
}

void set_func_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_opt_in[kernel] = bytes;
}

bool capturing() { return g_capturing.load(); }

ThreadState& this_thread() {
  if (g_current == nullptr) raise("a device built-in (threadIdx, ...) used outside a kernel");
  return g_current->ts;
}

void fail(const char* what) {
  if (g_current == nullptr) raise(what);
  g_failure = what;
  g_current->state = State::kFailed;
  switch_to_main();
  std::abort();  // never resumed
}

void* dynamic_shared() { return g_block->dynamic.get(); }

void* block_shared_bytes(const void* site, size_t n) {
  auto& slot = g_block->shared[site];
  if (!slot) {
    slot.reset(new unsigned char[n]);
    std::memset(slot.get(), 0xFF, n);
    g_block->static_bytes += n;
  }
  return slot.get();
}

void block_barrier() {
  g_current->state = State::kAtBlockBarrier;
  g_current->predicate = 0;
  switch_to_main();
}

int block_barrier_or(int predicate) {
  g_current->state = State::kAtBlockBarrier;
  g_current->predicate = predicate;
  switch_to_main();
  return g_current->barrier_result;
}

void warp_barrier(unsigned mask, BarrierKind kind) {
  if (mask != 0xffffffffu) fail("__syncwarp: only the full mask is emulated");
  g_current->state = State::kAtWarpBarrier;
  g_current->kind = kind;
  switch_to_main();
}

uint64_t* warp_exchange_slot(int lane) {
  return &g_block->exchange[g_current->linear / 32][lane];
}

void check_launch_bounds(long long max_threads) {
  const dim3& d = g_current->ts.block_dim;
  if (static_cast<long long>(d.x) * d.y * d.z > max_threads) {
    fail("a launch with more threads per block than the kernel's __launch_bounds__");
  }
}

int lane_id() { return g_current->linear % 32; }

int warp_lanes() { return std::min(32, g_block->nthreads - (g_current->linear / 32) * 32); }

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  TORCH_CHECK(g_current == nullptr, "CUDA emulation: a kernel launched from inside a kernel");
  const dim3 g = cfg.grid, bl = cfg.block;
  const int64_t threads = int64_t{bl.x} * bl.y * bl.z;
  if (threads < 1 || threads > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64) {
    raise("invalid block shape (" + std::to_string(bl.x) + ", " + std::to_string(bl.y) + ", " +
          std::to_string(bl.z) + ")");
  }
  if (g.x < 1 || g.x > 2147483647u || g.y < 1 || g.y > 65535 || g.z < 1 || g.z > 65535) {
    raise("invalid grid shape (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
          std::to_string(g.z) + ")");
  }
  size_t limit = kDefaultSmemLimit;
  auto it = g_opt_in.find(cfg.kernel);
  if (it != g_opt_in.end()) {
    limit = std::max(limit, device_properties().sharedMemPerBlockOptin);
    if (cfg.dynamic_smem > static_cast<size_t>(it->second)) {
      raise("a launch asks for " + std::to_string(cfg.dynamic_smem) +
            " bytes of dynamic shared memory, more than the kernel opted in to (" +
            std::to_string(it->second) + ")");
    }
  } else if (cfg.dynamic_smem > kDefaultSmemLimit) {
    raise("a launch asks for " + std::to_string(cfg.dynamic_smem) +
          " bytes of dynamic shared memory without opting in (cudaFuncSetAttribute)");
  }
  g_body = body;
  g_body_ctx = ctx;
  ++g_launches;
  const int64_t nblocks = int64_t{g.x} * g.y * g.z;
  if (nblocks > (int64_t{1} << 24)) {
    raise("a grid of " + std::to_string(nblocks) + " blocks: more than this emulator runs");
  }
  std::vector<int> order = schedule_order(static_cast<int>(nblocks), -1);
  for (int i : order) {
    const int64_t lin = i;
    const uint3 bidx{static_cast<unsigned>(lin % g.x), static_cast<unsigned>((lin / g.x) % g.y),
                     static_cast<unsigned>(lin / (int64_t{g.x} * g.y))};
    run_block(cfg, bidx, lin, limit);
  }
}

}  // namespace cuda_emu

namespace {
struct PendingCopy {
  void* dst;
  std::vector<unsigned char> bytes;  // the source as it was when the copy was issued
};
std::mutex g_copy_mutex;
std::vector<PendingCopy> g_pending_copies;
int g_event_queries_since_record = 0;

void land_pending_copies() {
  for (auto& c : g_pending_copies) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
  g_pending_copies.clear();
}
}  // namespace

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  std::lock_guard<std::mutex> lock(g_copy_mutex);
  if (kind != cudaMemcpyDeviceToHost) {
    std::memmove(dst, src, n);
    return cudaSuccess;
  }
  const auto* s = static_cast<const unsigned char*>(src);
  g_pending_copies.push_back({dst, std::vector<unsigned char>(s, s + n)});
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) {
  std::lock_guard<std::mutex> lock(g_copy_mutex);
  land_pending_copies();
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) {
  std::lock_guard<std::mutex> lock(g_copy_mutex);
  g_event_queries_since_record = 0;
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t) {
  std::lock_guard<std::mutex> lock(g_copy_mutex);
  if (g_event_queries_since_record++ == 0) return cudaErrorNotReady;
  land_pending_copies();
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) {
  *p = std::malloc(n);
  return *p != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}

// The emulated library's copies of the embed-algorithm override and of the fast / naive
// kernel switch (kernel_impl.h; the real ones live in the charmlp extension, which this
// library does not link): set with _emu_configure and _emu_set_kernel_impl.
namespace charmlp {
namespace {
std::atomic<int> g_embed_algorithm{0};
std::atomic<int> g_kernel_impl{0};
}
void set_embed_algorithm(EmbedAlgorithm a) { g_embed_algorithm = static_cast<int>(a); }
EmbedAlgorithm get_embed_algorithm() { return static_cast<EmbedAlgorithm>(g_embed_algorithm.load()); }
void set_kernel_impl(KernelImpl impl) { g_kernel_impl = static_cast<int>(impl); }
KernelImpl get_kernel_impl() { return static_cast<KernelImpl>(g_kernel_impl.load()); }
}  // namespace charmlp

namespace {

void configure(int64_t schedule, bool capturing, int64_t embed_algorithm) {
  TORCH_CHECK(schedule >= 0, "CUDA emulation: schedule must be >= 0, got ", schedule);
  TORCH_CHECK(embed_algorithm >= 0 && embed_algorithm <= 2,
              "CUDA emulation: embed_algorithm must be 0 (auto), 1 (direct) or 2 (folded), got ",
              embed_algorithm);
  cuda_emu::g_schedule = schedule;
  cuda_emu::g_capturing = capturing;
  charmlp::set_embed_algorithm(static_cast<charmlp::EmbedAlgorithm>(embed_algorithm));
}

void set_kernel_impl(const std::string& name) {
  TORCH_CHECK_VALUE(name == "fast" || name == "naive",
                    "CUDA emulation: kernel_impl must be 'fast' or 'naive', got '", name, "'");
  charmlp::set_kernel_impl(name == "naive" ? charmlp::KernelImpl::kNaive
                                            : charmlp::KernelImpl::kFast);
}

std::string kernel_impl() { return charmlp::use_naive_kernels() ? "naive" : "fast"; }

std::vector<int64_t> counters() { return {cuda_emu::g_launches.load(), cuda_emu::g_threads_run.load()}; }

}  // namespace

// Control ops of the emulation itself (not charmlp ops): see build.py.
TORCH_LIBRARY_FRAGMENT(charmlp_cuda_emu, m) {
  m.def("_emu_configure(int schedule, bool capturing, int embed_algorithm) -> ()", &configure);
  m.def("_emu_counters() -> int[]", &counters);
  m.def("_emu_set_kernel_impl(str name) -> ()", &set_kernel_impl);
  m.def("_emu_kernel_impl() -> str", &kernel_impl);
}
