// Enough of CUDA's programming model and runtime to run kdfast's kernels on the host, so that
// machines without a GPU test the CUDA code itself, not only the math it shares with the CPU
// launchers. Force-included (-include) into every translation unit of the emulated
// kdfast._C_cuda; the build (tests/cuda_emulator/__init__.py) rewrites each
// `kernel<<<grid, block, smem, stream>>>(args)` launch into
// `::cuda_emu::launch(kernel, grid, block, smem, stream)(args)`.
//
// Every CUDA thread of a block is a fiber (its own stack). A block's fibers run on the calling
// thread one at a time and switch only where CUDA threads synchronise: __syncthreads(_or),
// warp shuffles and __match_any_sync. Shared memory is static storage, filled with 0xff bytes
// (NaN floats, -1 integers) before each block as a GPU leaves it uninitialised, and atomics are
// plain read-modify-writes: nothing else runs meanwhile. Blocks run one after another, one
// launch at a time in the process. A launch fails (cudaErrorLaunchFailure, with the reason in
// cudaGetErrorString) where real hardware would hang or be undefined: a barrier that some
// live threads never reach, threads meeting at barriers of different places in the code, a
// full-mask shuffle after a lane of its warp has exited, a launch from inside a kernel.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------- types and runtime API

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
#define CUDART_VERSION 13000

namespace cuda_emu {
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local std::string last_message;

inline void set_error(cudaError_t e, std::string message) {
  if (last_error == cudaSuccess) {  // the first error sticks, as CUDA reports the first
    last_error = e;
    last_message = std::move(message);
  }
}
}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::last_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
// The reason of the last failed launch (kept after cudaGetLastError clears the code, so that a
// binding can read the name first and the string second, as bind_cuda.cpp does).
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : cuda_emu::last_message.c_str();
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

// ---------------------------------------------------------------- fibers and barriers

namespace cuda_emu {

constexpr std::size_t kStackBytes = 1024 * 1024;  // (a GPU allows up to 512 KiB per thread)
constexpr std::size_t kGuardBytes = 64 * 1024;    // below each stack, unmapped: an overflow faults
constexpr unsigned kFullMask = 0xffffffffu;

enum Collective : int { kNone = 0, kSync, kSyncOr, kShuffleXor, kMatchAny };

// One CUDA thread of the block being run (thread i runs on fiber slot i).
struct Fiber {
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
  Collective waiting = kNone;  // the collective this fiber waits in, if any
  uint64_t value = 0;          // what it brought to the collective
  int arg = 0;                 // the shuffle's lane mask
  uint64_t result = 0;         // what the collective gave it
};

// A set of threads that meet at barriers: one block, or one warp.
struct Group {
  int live = 0;     // members that have not exited
  int arrived = 0;  // members waiting in the current collective
  Collective kind = kNone;
  const char* file = nullptr;
  int line = 0, site = 0;
};

struct Launch {
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  std::vector<Fiber> fibers;
  std::vector<Group> warps;
  Group block_group;
  void (*invoke)(const void* closure) = nullptr;
  const void* closure = nullptr;
  bool failed = false;
};

// A fiber's stack and where to resume it. Slots live for the process and are reused by every
// block: a fiber whose thread has ended parks at the top of its loop (fiber_main) and runs the
// next block's thread i when resumed, so starting a thread costs a jump, not a system call.
struct Slot {
  void* stack = nullptr;
  ucontext_t start;  // the fiber's first entry into fiber_main
  void* resume_point[5];  // __builtin_setjmp's: no libc longjmp, which sanitizers intercept
  bool running = false;  // parked or suspended in a thread (else: start it from `start`)
};

inline thread_local Launch* current_launch = nullptr;
inline thread_local Fiber* current_fiber = nullptr;
inline thread_local Slot* current_slot = nullptr;
inline thread_local void* scheduler_point[5];
inline std::mutex launch_mutex;  // shared memory is static: one launch at a time in the process
inline thread_local unsigned launches = 0;
inline thread_local std::vector<Slot*> slots;  // (a Slot never moves: its context points into itself)

inline std::string where(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

// Jumps to a point saved by __builtin_setjmp. Not instrumented: AddressSanitizer would unpoison
// the suspended fiber's frames before a jump it sees (and miss overflows of them after).
__attribute__((noipa, no_sanitize_address)) inline void jump_to(void** point) { __builtin_longjmp(point, 1); }

// AddressSanitizer (a build with -fsanitize=address, tests/cuda_emulator/asan.py) is told of
// every switch between the scheduler's stack and a fiber's, so that it checks each against
// the right stack's bounds.
#if defined(__SANITIZE_ADDRESS__)
inline thread_local const void* scheduler_stack_bottom = nullptr;
inline thread_local std::size_t scheduler_stack_size = 0;
inline void leaving_for_fiber(const void* stack) { __sanitizer_start_switch_fiber(nullptr, stack, kStackBytes); }
inline void arrived_on_fiber() {
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
}
inline void leaving_for_scheduler() {
  __sanitizer_start_switch_fiber(nullptr, scheduler_stack_bottom, scheduler_stack_size);
}
inline void arrived_on_scheduler() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
#else
inline void leaving_for_fiber(const void*) {}
inline void arrived_on_fiber() {}
inline void leaving_for_scheduler() {}
inline void arrived_on_scheduler() {}
#endif

// Back to the scheduler, to continue where this was called when the fiber is resumed.
__attribute__((noinline)) inline void suspend() {
  if (!__builtin_setjmp(current_slot->resume_point)) {
    leaving_for_scheduler();
    jump_to(scheduler_point);
  }
  arrived_on_fiber();
}

// Fails the launch from inside a fiber: the block is abandoned (its fibers hold no resources).
[[noreturn]] inline void fail_in_fiber(std::string message) {
  set_error(cudaErrorLaunchFailure, "emulated CUDA: " + message);
  current_launch->failed = true;
  leaving_for_scheduler();
  jump_to(scheduler_point);
  __builtin_unreachable();
}

// Hands each waiting member of `g` its result and makes it runnable again.
inline void release(Launch& L, Group& g, int warp) {
  const bool whole_block = warp < 0;
  const int first = whole_block ? 0 : warp * 32;
  const int last = whole_block ? int(L.fibers.size()) : std::min(int(L.fibers.size()), first + 32);
  uint64_t any = 0;
  if (g.kind == kSyncOr)
    for (int i = first; i < last; ++i)
      if (L.fibers[i].waiting == kSyncOr) any |= L.fibers[i].value != 0;
  for (int i = first; i < last; ++i) {
    Fiber& f = L.fibers[i];
    if (f.waiting == kNone || f.done) continue;
    switch (g.kind) {
      case kSyncOr: f.result = any; break;
      case kShuffleXor: f.result = L.fibers[first + ((f.lane ^ f.arg) & 31)].value; break;
      case kMatchAny: {
        uint64_t peers = 0;
        for (int j = first; j < last; ++j)
          if (L.fibers[j].value == f.value) peers |= uint64_t(1) << (j - first);
        f.result = peers;
        break;
      }
      default: f.result = 0;
    }
    f.waiting = kNone;
  }
  g.arrived = 0;
  g.kind = kNone;
}

// The calling thread joins a collective of its block (warp < 0) or of its warp and returns
// when every live member has joined it, with the collective's result.
inline uint64_t join(Collective kind, int warp, uint64_t value, int arg, const char* file, int line, int site) {
  Launch& L = *current_launch;
  Fiber& f = *current_fiber;
  Group& g = warp < 0 ? L.block_group : L.warps[warp];
  if (warp >= 0 && g.live < 32)
    fail_in_fiber("a full-mask warp collective at " + where(file, line) + " in a warp of " +
                  std::to_string(g.live) + " live lanes (block of " + std::to_string(L.fibers.size()) +
                  " threads, or lanes that have exited)");
  if (g.arrived == 0) {
    g.kind = kind;
    g.file = file;
    g.line = line;
    g.site = site;
  } else if (g.kind != kind || g.line != line || g.site != site || std::strcmp(g.file, file) != 0) {
    fail_in_fiber(std::string("threads of one ") + (warp < 0 ? "block" : "warp") + " meet at different barriers: " +
                  where(g.file, g.line) + " and " + where(file, line) +
                  (g.line == line ? " (two collectives on one line)" : ""));
  }
  f.waiting = kind;
  f.value = value;
  f.arg = arg;
  if (++g.arrived == g.live)
    release(L, g, warp);
  else
    suspend();
  return f.result;
}

// The end of the current thread: it no longer counts at its block's barriers (as on Volta and
// later); a warp collective that waits for it would read its lane, undefined on a GPU.
inline void thread_exit() {
  Launch& L = *current_launch;
  Fiber& f = *current_fiber;
  f.done = true;
  Group& w = L.warps[f.warp];
  --w.live;
  if (w.arrived > 0)
    fail_in_fiber("a lane exited while its warp waits at " + where(w.file, w.line));
  if (--L.block_group.live > 0 && L.block_group.arrived == L.block_group.live)
    release(L, L.block_group, -1);
}

inline void fiber_main() {
  arrived_on_fiber();
  for (;;) {
    current_launch->invoke(current_launch->closure);
    thread_exit();
    suspend();  // parked: resumed to run the same thread index of the next block
  }
}

__attribute__((noinline)) inline void resume(Fiber& f, Slot& slot) {
  current_fiber = &f;
  current_slot = &slot;
  if (!__builtin_setjmp(scheduler_point)) {
    leaving_for_fiber(slot.stack);
    if (!slot.running) {
      slot.running = true;
#if defined(__SANITIZE_ADDRESS__)
      __asan_unpoison_memory_region(slot.stack, kStackBytes);  // frames an abandoned block left poisoned
#endif
      makecontext(&slot.start, fiber_main, 0);
      setcontext(&slot.start);
    }
    jump_to(slot.resume_point);
  }
  arrived_on_scheduler();
}

// Slots 0..n-1, made on first use.
inline bool reserve_slots(std::size_t n) {
  while (slots.size() < n) {
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    char* base = static_cast<char*>(mmap(nullptr, kGuardBytes + kStackBytes, PROT_NONE, flags, -1, 0));
    if (base == MAP_FAILED) return false;
    void* stack = base + kGuardBytes;
    if (mprotect(stack, kStackBytes, PROT_READ | PROT_WRITE) != 0) return false;
    Slot* slot = new Slot();
    slot->stack = stack;
    getcontext(&slot->start);
    slot->start.uc_stack.ss_sp = stack;
    slot->start.uc_stack.ss_size = kStackBytes;
    slot->start.uc_link = nullptr;
    slots.push_back(slot);
  }
  return true;
}

// Runs the block's threads to their ends. Between barriers they run in order of thread index,
// or in reverse, alternately (starting with the block's parity): a thread reading shared
// memory that another writes without a barrier between them reads it too early in one of the
// two orders.
// Every __shared__ variable of the module, registered where it is declared (the build adds a
// SharedRegion after each declaration): filled with 0xff bytes when registered and before
// every block, as a GPU leaves shared memory (not zeroed, nothing carried over from a block).
inline std::vector<std::pair<void*, std::size_t>>& shared_regions() {
  static std::vector<std::pair<void*, std::size_t>> regions;
  return regions;
}

struct SharedRegion {
  SharedRegion(void* address, std::size_t bytes) {
    std::memset(address, 0xff, bytes);
    shared_regions().emplace_back(address, bytes);
  }
};

inline bool run_block(Launch& L, bool reverse) {
  const int n = int(L.fibers.size());
  for (const auto& region : shared_regions()) std::memset(region.first, 0xff, region.second);
  for (Fiber& f : L.fibers) {
    f.done = false;
    f.waiting = kNone;
  }
  for (Group& w : L.warps) w = Group{};
  for (int i = 0; i < n; ++i) ++L.warps[L.fibers[i].warp].live;
  L.block_group = Group{};
  L.block_group.live = n;
  for (int remaining = n; remaining > 0; reverse = !reverse) {
    bool ran = false;
    for (int k = 0; k < n && !L.failed; ++k) {
      const int i = reverse ? n - 1 - k : k;
      Fiber& f = L.fibers[i];
      if (f.done || f.waiting != kNone) continue;
      resume(f, *slots[i]);
      ran = true;
      if (f.done) --remaining;
    }
    if (L.failed) break;
    if (!ran) {
      std::string sites;
      for (int i = 0; i < n; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.done || f.waiting == kNone) continue;
        const Group& g = f.waiting == kSync || f.waiting == kSyncOr ? L.block_group : L.warps[f.warp];
        sites = where(g.file, g.line);
        break;
      }
      set_error(cudaErrorLaunchFailure, "emulated CUDA: a barrier at " + sites + " that " +
                                            "some live threads of the block never reach (divergent __syncthreads)");
      L.failed = true;
      break;
    }
  }
  if (L.failed)  // the block's fibers are abandoned where they stand: start them afresh next time
    for (int i = 0; i < n; ++i) slots[i]->running = false;
  return !L.failed;
}

inline void run(dim3 grid, dim3 block, std::size_t smem, void (*invoke)(const void*), const void* closure) {
  if (current_launch != nullptr) {  // (the caller's own fiber would be reused)
    set_error(cudaErrorLaunchFailure, "emulated CUDA: a launch from inside a kernel is not emulated");
    return;
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              "emulated CUDA: invalid configuration argument (grid " + std::to_string(grid.x) + "x" +
                  std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
                  std::to_string(block.y) + "x" + std::to_string(block.z) + ")");
    return;
  }
  if (smem != 0) {
    set_error(cudaErrorInvalidValue, "emulated CUDA: dynamic shared memory is not emulated");
    return;
  }
  std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
  if (!reserve_slots(threads)) {
    set_error(cudaErrorLaunchFailure, "emulated CUDA: out of memory for thread stacks");
    return;
  }
  Launch L;
  L.grid_dim = grid;
  L.block_dim = block;
  L.invoke = invoke;
  L.closure = closure;
  L.fibers.resize(threads);
  L.warps.resize((threads + 31) / 32);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = L.fibers[i];
    f.tid = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    f.lane = int(i % 32);
    f.warp = int(i / 32);
  }
  current_launch = &L;
  // Which order the first block starts in alternates between launches too, so that one-block
  // launches run both ways across a test's calls.
  const unsigned first_order = launches++ % 2;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        L.block_idx = uint3{x, y, z};
        if (!run_block(L, (x + y + z + first_order) % 2 == 1)) {
          current_launch = nullptr;
          current_fiber = nullptr;
          return;
        }
      }
  current_launch = nullptr;
  current_fiber = nullptr;
}

// `launch(kernel, grid, block, smem, stream)(args...)`: runs every thread of the grid before
// returning (the stream is ignored: emulated launches are synchronous).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t smem;
  long long max_threads = 1024;  // the kernel's __launch_bounds__ (the build passes it on)

  Launcher bounded(long long threads) const {
    Launcher l = *this;
    l.max_threads = threads;
    return l;
  }

  template <typename... A>
  void operator()(A&&... args) const {
    const long long threads = 1ll * block.x * block.y * block.z;
    if (threads > max_threads && threads <= 1024) {  // a GPU refuses what the bounds rule out
      set_error(cudaErrorLaunchOutOfResources,
                "emulated CUDA: too many resources requested for launch (a block of " +
                    std::to_string(threads) + " threads, __launch_bounds__(" +
                    std::to_string(max_threads) + "))");
      return;
    }
    struct Closure {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    };
    const Closure closure{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run(grid, block, smem,
        [](const void* c) {
          auto* cl = static_cast<const Closure*>(c);
          std::tuple<std::decay_t<P>...> copy = cl->args;  // each thread gets its own parameters
          std::apply(cl->kernel, copy);
        },
        &closure);
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline void check_full_mask(unsigned mask, const char* what, const char* file, int line) {
  if (mask != kFullMask)
    fail_in_fiber(std::string(what) + " at " + where(file, line) + " with a partial mask is not emulated");
}

// Each collective names its place in the code, where threads must meet: file, line and the
// number of its expansion in the file (__COUNTER__), which tells two on one line apart.
template <typename T>
inline T shfl_xor(const char* file, int line, int site, unsigned mask, T v, int lane_mask) {
  check_full_mask(mask, "__shfl_xor_sync", file, line);
  return from_bits<T>(join(kShuffleXor, current_fiber->warp, to_bits(v), lane_mask, file, line, site));
}

template <typename T>
inline unsigned match_any(const char* file, int line, int site, unsigned mask, T v) {
  check_full_mask(mask, "__match_any_sync", file, line);
  return unsigned(join(kMatchAny, current_fiber->warp, to_bits(v), 0, file, line, site));
}

inline void syncthreads(const char* file, int line, int site) { join(kSync, -1, 0, 0, file, line, site); }
inline int syncthreads_or(const char* file, int line, int site, int v) {
  return int(join(kSyncOr, -1, uint64_t(v != 0), 0, file, line, site));
}

}  // namespace cuda_emu

// ---------------------------------------------------------------- the kernel language

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // (the build reads the bound, and launches are checked against it)
#define __shared__ static  // (registered by the build: see SharedRegion)
#define threadIdx (::cuda_emu::current_fiber->tid)
#define blockIdx (::cuda_emu::current_launch->block_idx)
#define blockDim (::cuda_emu::current_launch->block_dim)
#define gridDim (::cuda_emu::current_launch->grid_dim)
#define KD_EMU_HERE __FILE__, __LINE__, __COUNTER__
#define __syncthreads() ::cuda_emu::syncthreads(KD_EMU_HERE)
#define __syncthreads_or(v) ::cuda_emu::syncthreads_or(KD_EMU_HERE, (v))
#define __shfl_xor_sync(mask, v, lane_mask) ::cuda_emu::shfl_xor(KD_EMU_HERE, (mask), (v), (lane_mask))
#define __match_any_sync(mask, v) ::cuda_emu::match_any(KD_EMU_HERE, (mask), (v))

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
// CUDA's floating-point min and max are fminf / fmaxf: a NaN operand gives the other one.
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
inline T atomicAdd(T* address, T v) {  // fibers never run at once: a plain read-modify-write
  const T old = *address;
  *address = old + v;
  return old;
}
template <typename T>
inline T atomicOr(T* address, T v) {  // (integer types, as CUDA's)
  static_assert(std::is_integral<T>::value, "atomicOr takes integers");
  const T old = *address;
  *address = old | v;
  return old;
}
inline float __uint_as_float(unsigned u) { return cuda_emu::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return unsigned(cuda_emu::to_bits(f)); }
// Round-to-nearest arithmetic without contraction (the build passes -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

struct __half {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half_rn(float f) {  // IEEE conversion: round to nearest even
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
