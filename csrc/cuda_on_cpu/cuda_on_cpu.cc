// cuda_on_cpu -- the block scheduler (see cuda_on_cpu.h). Threads are fibers: a fiber runs until
// it reaches a barrier or returns, then the scheduler resumes the next one. A fiber starts once
// with makecontext and then runs the kernel body for one block after another. Switches are
// GCC's __builtin_setjmp/__builtin_longjmp: swapcontext costs a system call and ASan's longjmp
// handling clears shadow memory each time, which made the tests several times slower.
// (*.cc, not *.cpp: setup.py builds every csrc/*/*.cpp into the torch extension.)
#include "cuda_on_cpu.h"

#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <memory>
#include <random>
#include <unordered_map>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_ON_CPU_ASAN 1
#endif

// Bounds of the static __shared__ variables' section (set by the linker; null without any).
extern "C" char __start_cuda_on_cpu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_on_cpu_shared[] __attribute__((weak));

namespace {
int g_device = 0;
}  // namespace

cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cuda_on_cpu::kDeviceCount) return cudaErrorInvalidValue;
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= cuda_on_cpu::kDeviceCount) return cudaErrorInvalidValue;
  const cuda_on_cpu::Device& d = cuda_on_cpu::kDevices[device];
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(d.smem_per_block); break;
    case cudaDevAttrMultiProcessorCount: *value = d.multiprocessors; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = static_cast<int>(d.smem_per_multiprocessor); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(d.smem_per_block_optin); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

namespace cuda_on_cpu {
namespace {

// Generous: the kernels need a few KiB, AddressSanitizer's redzones several times that.
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kAtBarrier, kAtShuffle, kDone };
constexpr unsigned kBallot = ~0u;

struct Fiber {
  ucontext_t ctx;  // first entry only
  void* jmp[5];  // __builtin_setjmp buffer
  bool started = false;
  std::unique_ptr<char[]> stack;
  uint3 idx;
  State state;
  unsigned mask, src;    // shuffle request (src kBallot: a ballot)
  uint64_t value, got;   // shuffle value sent / received
};

struct Scheduler {
  std::mt19937_64 rng{0};
  std::vector<Fiber> fibers;
  void* main_jmp[5];
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::unique_ptr<unsigned char[]> smem;
  std::vector<LaunchRecord> launches;
  std::string error;
  cudaError_t last = cudaSuccess;
  const void* kernel = nullptr;  // the running launch's
  size_t smem_bytes = 0;
#ifdef CUDA_ON_CPU_ASAN
  const void* main_stack = nullptr;
  size_t main_stack_size = 0;
#endif
};

Scheduler g_sched;
Scheduler& sched() { return g_sched; }

// ---- race detection ----------------------------------------------------------------------
// The kernels' loads and stores reach track() through AddressSanitizer's out-of-line checks
// (the .cu sources are compiled with --param asan-instrumentation-with-call-threshold=0; the
// hooks at the end of this file run ASan's own check, then this). Shadow memory per byte:
// the last writer and the readers since, stamped with the barrier interval (a new stamp at
// each block start and each __syncthreads, so nothing needs clearing) and with the warp's
// synchronisation count (a shuffle, vote or __syncwarp orders the lanes of a warp). Two
// accesses to a byte, one a write, by different threads in one interval, unordered by their
// warp, are a race: the launch fails naming the kernel, the address and the two threads.
struct Shadow {
  uint32_t stamp = 0;
  int16_t writer = -1, reader = -1, last = -1;  // thread index in the block; reader kMany: several
  uint32_t writer_sync = 0, reader_sync = 0, last_sync = 0;
  uint8_t value = 0;  // the byte after the last access (of thread `last`)
};
constexpr int16_t kMany = -2;
constexpr size_t kPageBytes = 4096;

struct Races {
  uint32_t stamp = 0;
  std::vector<uint32_t> warp_sync;  // per warp of the block
  std::unordered_map<uintptr_t, std::unique_ptr<Shadow[]>> pages;
  std::string report;  // the first race of the launch

  void new_block(size_t threads) {
    ++stamp;
    warp_sync.assign((threads + 31) / 32, 0);
    pages.clear();
  }
  Shadow& at(uintptr_t a) {
    std::unique_ptr<Shadow[]>& page = pages[a / kPageBytes];
    if (!page) page.reset(new Shadow[kPageBytes]);
    return page[a % kPageBytes];
  }
};

Races g_races;

// Context switches, announced to AddressSanitizer so that it tracks the right stack. Neither
// instrumented nor inlined into code that is: ASan would "unpoison" the stack left behind before
// the no-return jump (it is suspended, not unwound), at the cost of a system call and a memset
// per switch.
#define CUDA_ON_CPU_SWITCH [[gnu::noinline, gnu::no_sanitize_address]]

// Not in a function that calls __builtin_setjmp (GCC's rule).
CUDA_ON_CPU_SWITCH void jump(void** buf) { __builtin_longjmp(buf, 1); }

CUDA_ON_CPU_SWITCH void enter_fiber(Fiber& f) {
  Scheduler& s = sched();
#ifdef CUDA_ON_CPU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.get(), kStackBytes);
#endif
  if (__builtin_setjmp(s.main_jmp) == 0) {
    if (f.started) jump(f.jmp);
    f.started = true;
    setcontext(&f.ctx);
  }
#ifdef CUDA_ON_CPU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

CUDA_ON_CPU_SWITCH void leave_fiber(Fiber& f) {
  Scheduler& s = sched();
#ifdef CUDA_ON_CPU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, s.main_stack, s.main_stack_size);
#endif
  if (__builtin_setjmp(f.jmp) == 0) jump(s.main_jmp);
#ifdef CUDA_ON_CPU_ASAN
  __sanitizer_finish_switch_fiber(fake, &s.main_stack, &s.main_stack_size);
#endif
}

void fiber_main() {
  Scheduler& s = sched();
#ifdef CUDA_ON_CPU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack, &s.main_stack_size);
#endif
  for (;;) {
    (*s.body)();
    Fiber& f = s.fibers[s.current];
    f.state = State::kDone;
    leave_fiber(f);
  }
}

Fiber& self() { return sched().fibers[sched().current]; }

void wait(State st) {
  Fiber& f = self();
  f.state = st;
  leave_fiber(f);
}

const char* state_name(State st) {
  switch (st) {
    case State::kRunnable: return "running";
    case State::kAtBarrier: return "__syncthreads";
    case State::kAtShuffle: return "a warp shuffle";
    case State::kDone: return "exited";
  }
  return "?";
}

// Releases every warp whose lanes all wait in a shuffle; false if none could be.
bool release_shuffles(std::string& error) {
  std::vector<Fiber>& fs = sched().fibers;
  bool any = false;
  for (size_t w = 0; w < fs.size(); w += 32) {
    const size_t n = std::min<size_t>(32, fs.size() - w);
    const unsigned full = n == 32 ? 0xffffffffu : (1u << n) - 1;
    bool all = true;
    for (size_t l = 0; l < n; ++l) all = all && fs[w + l].state == State::kAtShuffle;
    if (!all) continue;
    for (size_t l = 0; l < n; ++l) {
      const Fiber& f = fs[w + l];
      if (f.mask != full || (f.src >= n && f.src != kBallot)) {
        error = "warp " + std::to_string(w / 32) + ": shuffle with mask " + std::to_string(f.mask) + " or source lane " +
                std::to_string(f.src) + " outside the warp's " + std::to_string(n) + " lanes";
        return false;
      }
    }
    uint64_t votes = 0;
    for (size_t l = 0; l < n; ++l) votes |= uint64_t(fs[w + l].value != 0) << l;
    for (size_t l = 0; l < n; ++l) fs[w + l].got = fs[w + l].src == kBallot ? votes : fs[w + fs[w + l].src].value;
    for (size_t l = 0; l < n; ++l) fs[w + l].state = State::kRunnable;
    ++g_races.warp_sync[w / 32];
    any = true;
  }
  return any;
}

// (Its own function: getcontext returns twice, which clobbers locals around it.)
void make_fiber(Fiber& f) {
  f.stack.reset(new char[kStackBytes]);
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
}

// Runs one block to completion; "" or why it cannot complete.
std::string run_block(Scheduler& s) {
  std::vector<int> order(s.fibers.size());
  for (size_t i = 0; i < s.fibers.size(); ++i) {
    s.fibers[i].state = State::kRunnable;
    order[i] = static_cast<int>(i);
  }
  for (;;) {
    std::shuffle(order.begin(), order.end(), s.rng);
    bool ran = false;
    for (int i : order) {
      if (s.fibers[i].state != State::kRunnable) continue;
      s.current = i;
      threadIdx = s.fibers[i].idx;
      enter_fiber(s.fibers[i]);
      ran = true;
    }
    s.current = -1;
    if (ran) continue;
    std::string error;
    if (release_shuffles(error)) continue;
    if (!error.empty()) return error;
    size_t at_barrier = 0, done = 0;
    for (const Fiber& f : s.fibers) {
      at_barrier += f.state == State::kAtBarrier;
      done += f.state == State::kDone;
    }
    if (done == s.fibers.size()) return "";
    if (at_barrier == s.fibers.size()) {
      ++g_races.stamp;  // a new barrier interval
      for (Fiber& f : s.fibers) f.state = State::kRunnable;
      continue;
    }
    error = "deadlock:";
    for (size_t i = 0; i < s.fibers.size(); ++i) {
      if (i == 0 || s.fibers[i].state != s.fibers[i - 1].state)
        error += " thread " + std::to_string(i) + "+ in " + state_name(s.fibers[i].state) + ";";
    }
    return error;
  }
}

std::string thread_name(int t) {
  const uint3 i = sched().fibers[t].idx;
  return "thread (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

std::string where(uintptr_t a) {
  const Scheduler& s = sched();
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(s.smem.get());
  const uintptr_t st0 = reinterpret_cast<uintptr_t>(__start_cuda_on_cpu_shared);
  const uintptr_t st1 = reinterpret_cast<uintptr_t>(__stop_cuda_on_cpu_shared);
  if (a - dyn < s.smem_bytes) return "dynamic shared memory +" + std::to_string(a - dyn);
  if (st0 != 0 && a >= st0 && a < st1) return "static shared memory +" + std::to_string(a - st0);
  char hex[32];
  std::snprintf(hex, sizeof hex, "%#lx", static_cast<unsigned long>(a));
  return std::string("global memory ") + hex;
}

// Whether u's access (warp sync count us) and v's are ordered: one thread, or one warp with a
// warp synchronisation between them.
bool ordered(int u, uint32_t us, int v, uint32_t vs) { return u == v || (u / 32 == v / 32 && us != vs); }

// The thread an access by t conflicts with (-2: several readers), or -1; `what` says how.
int conflict(const Shadow& e, int t, uint32_t ts, bool write, const char*& what) {
  if (e.writer >= 0 && !ordered(e.writer, e.writer_sync, t, ts)) {
    what = write ? "both write" : "one writes, the other reads";
    return e.writer;
  }
  if (write && e.reader == kMany) {
    what = "it writes what several threads read";
    return -2;
  }
  if (write && e.reader >= 0 && !ordered(e.reader, e.reader_sync, t, ts)) {
    what = "one reads, the other writes";
    return e.reader;
  }
  return -1;
}

void record(Shadow& e, int t, uint32_t ts, bool write) {
  if (write) {
    e.writer = static_cast<int16_t>(t);
    e.writer_sync = ts;
    e.reader = -1;
  } else if (e.reader < 0 || ordered(e.reader, e.reader_sync, t, ts)) {
    e.reader = static_cast<int16_t>(t);
    e.reader_sync = ts;
  } else {
    e.reader = kMany;
  }
}

void report(uintptr_t a, int u, int t, const char* what) {
  const Scheduler& s = sched();
  Dl_info info{};
  dladdr(s.kernel, &info);  // the kernel as its offset in the executable, as in the launch records
  const uintptr_t off = reinterpret_cast<uintptr_t>(s.kernel) - reinterpret_cast<uintptr_t>(info.dli_fbase);
  g_races.report = "data race in kernel@" + std::to_string(off) + " on " + where(a) + ": " +
                   (u >= 0 ? thread_name(u) + " and " : std::string()) + thread_name(t) + " (" + what +
                   ") between the same two barriers";
}

// An access of `n` bytes at `a` by the running thread (see Races). ASan checks the second of
// two accesses to one place in a basic block only once (the store of `*p += v` goes
// unreported): a byte whose value changed with no write seen was written by the last thread
// to touch it (no other thread runs in between: switches happen only at calls).
void track(uintptr_t a, size_t n, bool write) {
  Scheduler& s = sched();
  const int t = s.current;
  if (t < 0 || !g_races.report.empty()) return;  // host code, or already reported
  if (a - reinterpret_cast<uintptr_t>(s.fibers[t].stack.get()) < kStackBytes) return;  // its own stack
  Races& r = g_races;
  const uint32_t ts = r.warp_sync[t / 32];
  for (size_t k = 0; k < n; ++k) {
    Shadow& e = r.at(a + k);
    const uint8_t now = *reinterpret_cast<const uint8_t*>(a + k);
    const char* what = "";
    if (e.stamp != r.stamp) {
      e = Shadow{};
      e.stamp = r.stamp;
    } else if (now != e.value && e.writer != e.last) {  // the unseen store of e.last
      const int u = conflict(e, e.last, e.last_sync, true, what);
      if (u != -1) return report(a + k, u, e.last, what);
      record(e, e.last, e.last_sync, true);
    }
    const int u = conflict(e, t, ts, write, what);
    if (u != -1) return report(a + k, u, t, what);
    record(e, t, ts, write);
    e.last = static_cast<int16_t>(t);
    e.last_sync = ts;
    e.value = now;
  }
}

// An atomic's store, which the detector must not take for an unseen plain one.
void atomic_done(uintptr_t a, size_t n) {
  for (size_t k = 0; k < n && sched().current >= 0; ++k) {
    Shadow& e = g_races.at(a + k);
    if (e.stamp == g_races.stamp) e.value = *reinterpret_cast<const uint8_t*>(a + k);
  }
}

}  // namespace

void track_access(uintptr_t a, size_t n, bool write) { track(a, n, write); }
void track_atomic(uintptr_t a, size_t n) { atomic_done(a, n); }

void set_seed(uint64_t seed) { sched().rng.seed(seed); }

std::vector<LaunchRecord> take_launches() { return std::exchange(sched().launches, {}); }

const std::string& last_error() { return sched().error; }

void* dynamic_shared() { return sched().smem.get(); }

void block_barrier() { wait(State::kAtBarrier); }

unsigned warp_ballot(unsigned mask, int pred) { return static_cast<unsigned>(warp_exchange(mask, pred != 0, kBallot)); }

unsigned lane_id() { return static_cast<unsigned>(sched().current) % 32; }

uint64_t warp_exchange(unsigned mask, uint64_t value, unsigned src_lane) {
  Fiber& f = self();
  f.mask = mask;
  f.src = src_lane;
  f.value = value;
  wait(State::kAtShuffle);
  return self().got;
}

cudaError_t run_grid(const void* kernel, const cudaLaunchConfig_t& cfg, const std::function<void()>& body) {
  Scheduler& s = sched();
  s.launches.push_back({kernel, cfg.gridDim, cfg.blockDim, cfg.dynamicSmemBytes});
  const dim3 g = cfg.gridDim, b = cfg.blockDim;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  s.error.clear();
  if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu ||
      g.y > 65535 || g.z > 65535) {
    s.error = "invalid launch configuration";
    return s.last = cudaErrorInvalidConfiguration;
  }
  if (cfg.dynamicSmemBytes > kDevices[g_device].smem_per_block) {
    s.error = "dynamic shared memory over the " + std::to_string(kDevices[g_device].smem_per_block / 1024) +
              " KiB a launch gets without opt-in";
    return s.last = cudaErrorInvalidValue;
  }
  gridDim = g;
  blockDim = b;
  s.body = &body;
  s.fibers.reserve(1024);  // never reallocated: a parked fiber's context points into its Fiber
  s.fibers.resize(threads);
  for (uint64_t i = 0; i < threads; ++i) {
    Fiber& f = s.fibers[i];
    if (!f.stack) make_fiber(f);
    f.idx = uint3{unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (uint64_t(b.x) * b.y))};
  }
  s.smem.reset(new unsigned char[cfg.dynamicSmemBytes]);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back(uint3{x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), s.rng);
  s.kernel = kernel;
  s.smem_bytes = cfg.dynamicSmemBytes;
  g_races.report.clear();
  for (const uint3& blk : blocks) {
    blockIdx = blk;
    g_races.new_block(threads);
    std::memset(s.smem.get(), 0xff, cfg.dynamicSmemBytes);
    if (__start_cuda_on_cpu_shared != nullptr)
      std::memset(__start_cuda_on_cpu_shared, 0xff, __stop_cuda_on_cpu_shared - __start_cuda_on_cpu_shared);
    std::string err = run_block(s);
    if (err.empty()) err = g_races.report;
    if (!err.empty()) {
      s.error = "block (" + std::to_string(blk.x) + "," + std::to_string(blk.y) + "," + std::to_string(blk.z) +
                "): " + err;
      s.fibers.clear();  // abandoned mid-kernel: new fibers next launch
      return s.last = cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

}  // namespace cuda_on_cpu

cudaError_t cudaGetLastError() { return std::exchange(cuda_on_cpu::sched().last, cudaSuccess); }

namespace {
template <typename T, typename F>
T rmw(T* p, F f) {
  const T old = *p;
  *p = f(old);
  cuda_on_cpu::track_atomic(reinterpret_cast<uintptr_t>(p), sizeof(T));
  return old;
}
}  // namespace

float atomicAdd(float* p, float v) { return rmw(p, [v](float o) { return o + v; }); }
int atomicAdd(int* p, int v) { return rmw(p, [v](int o) { return int(unsigned(o) + unsigned(v)); }); }
unsigned atomicAdd(unsigned* p, unsigned v) { return rmw(p, [v](unsigned o) { return o + v; }); }
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return rmw(p, [v](unsigned long long o) { return o + v; });
}
int atomicMax(int* p, int v) { return rmw(p, [v](int o) { return o > v ? o : v; }); }
int atomicMin(int* p, int v) { return rmw(p, [v](int o) { return o < v ? o : v; }); }
int atomicExch(int* p, int v) { return rmw(p, [v](int) { return v; }); }
float atomicExch(float* p, float v) { return rmw(p, [v](float) { return v; }); }
int atomicCAS(int* p, int compare, int v) { return rmw(p, [=](int o) { return o == compare ? v : o; }); }
unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) {
  return rmw(p, [=](unsigned o) { return o == compare ? v : o; });
}
unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
  return rmw(p, [=](unsigned long long o) { return o == compare ? v : o; });
}

// AddressSanitizer's out-of-line checks, which the kernels' objects call (see Races): ASan's
// own check (the runtime's definition, next in the lookup order), then the race detector.
namespace {
using Check = void (*)(uintptr_t);
using CheckN = void (*)(uintptr_t, uintptr_t);

template <typename F>
F runtime(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}
}  // namespace

#define CUDA_ON_CPU_HOOK(kind, n, write)                                       \
  extern "C" void __asan_##kind##n(uintptr_t a) {                              \
    static const Check check = runtime<Check>("__asan_" #kind #n);             \
    check(a);                                                                  \
    cuda_on_cpu::track_access(a, n, write);                                    \
  }

CUDA_ON_CPU_HOOK(load, 1, false)
CUDA_ON_CPU_HOOK(load, 2, false)
CUDA_ON_CPU_HOOK(load, 4, false)
CUDA_ON_CPU_HOOK(load, 8, false)
CUDA_ON_CPU_HOOK(load, 16, false)
CUDA_ON_CPU_HOOK(store, 1, true)
CUDA_ON_CPU_HOOK(store, 2, true)
CUDA_ON_CPU_HOOK(store, 4, true)
CUDA_ON_CPU_HOOK(store, 8, true)
CUDA_ON_CPU_HOOK(store, 16, true)

extern "C" void __asan_loadN(uintptr_t a, uintptr_t n) {
  static const CheckN check = runtime<CheckN>("__asan_loadN");
  check(a, n);
  cuda_on_cpu::track_access(a, n, false);
}

extern "C" void __asan_storeN(uintptr_t a, uintptr_t n) {
  static const CheckN check = runtime<CheckN>("__asan_storeN");
  check(a, n);
  cuda_on_cpu::track_access(a, n, true);
}
