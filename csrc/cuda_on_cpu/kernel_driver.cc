// Test driver: runs fastdiff's CUDA launchers (compiled for the CPU with cuda_on_cpu) on
// request, for tests/test_cuda_kernels_on_cpu.py. Built with AddressSanitizer and UBSan, so it
// runs as its own process (a sanitized library cannot be loaded into Python).
//
// Protocol, on stdin/stdout. A request is one line, `OP key=value ...`, where a buffer value is
// `buf:BYTES:OFFSET` (BYTES raw bytes follow the line, in the order of the keys; the buffer
// starts OFFSET bytes into its own allocation, whose other bytes are poisoned for ASan) or
// `alias:KEY` (the same pointer as buffer KEY). The reply is one line `ok key=value ...` or
// `error MESSAGE`, followed (for `ok`) by every `buf:` buffer's bytes after the kernel ran.
// `device=D` picks the emulated device (cuda_on_cpu::kDevices; default 0, an H100).
#include <dlfcn.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

#include "../common/cuda_util.cuh"
#include "../group_norm_silu/group_norm_silu.cuh"
#include "../solver_step/solver_step.cuh"
#include "cuda_on_cpu.h"

namespace {

struct Buffer {
  std::unique_ptr<char[]> alloc;
  size_t bytes = 0, offset = 0;
  char* data() const { return alloc.get() + offset; }
};

struct Request {
  std::string op;
  std::map<std::string, std::string> kv;
  std::vector<std::string> order;  // buf: keys, in request order
  std::map<std::string, Buffer> bufs;

  bool has(const std::string& k) const { return kv.count(k) != 0; }
  double num(const std::string& k, double def = 0.0) const { return has(k) ? std::stod(kv.at(k)) : def; }
  int64_t i64(const std::string& k, int64_t def = 0) const { return has(k) ? std::stoll(kv.at(k)) : def; }
  void* ptr(const std::string& k) const {
    if (!has(k)) return nullptr;
    const std::string& v = kv.at(k);
    return v.rfind("alias:", 0) == 0 ? ptr(v.substr(6)) : bufs.at(k).data();
  }
};

// Parses the line and reads the buffers' bytes; false at end of input.
bool read_request(Request& r) {
  std::string line;
  if (!std::getline(std::cin, line)) return false;
  std::istringstream in(line);
  in >> r.op;
  for (std::string tok; in >> tok;) {
    const size_t eq = tok.find('=');
    const std::string k = tok.substr(0, eq), v = tok.substr(eq + 1);
    r.kv[k] = v;
    if (v.rfind("buf:", 0) != 0) continue;
    Buffer& b = r.bufs[k];
    const size_t colon = v.find(':', 4);
    b.bytes = std::stoull(v.substr(4, colon - 4));
    b.offset = std::stoull(v.substr(colon + 1));
    b.alloc.reset(new char[b.offset + b.bytes]);
    ASAN_POISON_MEMORY_REGION(b.alloc.get(), b.offset);
    r.order.push_back(k);
  }
  for (const std::string& k : r.order) std::cin.read(r.bufs[k].data(), r.bufs[k].bytes);
  return static_cast<bool>(std::cin);
}

// GRIDxYxZ/BLOCK/SMEM@KERNEL per launch, KERNEL the function's offset in the executable (the
// test names it from the symbol table).
std::string launches() {
  std::string s = "launches=";
  for (const cuda_on_cpu::LaunchRecord& l : cuda_on_cpu::take_launches()) {
    Dl_info info{};
    dladdr(l.kernel, &info);
    const uintptr_t off = reinterpret_cast<uintptr_t>(l.kernel) - reinterpret_cast<uintptr_t>(info.dli_fbase);
    s += std::to_string(l.grid.x) + "x" + std::to_string(l.grid.y) + "x" + std::to_string(l.grid.z) + "/" +
         std::to_string(l.block.x) + "/" + std::to_string(l.smem) + "@" + std::to_string(off) + ",";
  }
  return s;
}

// -> the reply's key=value text, or throws the error.
std::string solver_step(const Request& r) {
  namespace ss = fastdiff::solver_step;
  ss::Args a;
  a.numel = r.i64("numel");
  a.model_dtype = static_cast<ss::DType>(r.i64("model_dtype"));
  a.state_dtype = static_cast<ss::DType>(r.i64("state_dtype"));
  a.x = r.ptr("x");
  a.model = r.ptr("model");
  a.uncond = r.ptr("uncond");
  for (int k = 0; k < 3; ++k) a.hist_read[k] = r.ptr("hist" + std::to_string(k + 1));
  a.noise = r.ptr("noise");
  a.out = r.ptr("out");
  a.hist_write = r.ptr("hist_write");
  for (int k = 0; k < ss::kNumCoefs; ++k) a.coef[k] = static_cast<float>(r.num("c" + std::to_string(k)));
  a.guidance = static_cast<float>(r.num("guidance", 1.0));
  a.guidance_ptr = static_cast<const float*>(r.ptr("guidance_ptr"));
  a.clamp = static_cast<float>(r.num("clamp"));
  const cudaError_t err = ss::solver_step_cuda(a, nullptr);
  if (err != cudaSuccess) throw std::runtime_error("cuda error " + std::to_string(err) + " " + cuda_on_cpu::last_error());
  return "vectorized=" + std::to_string(ss::solver_step_cuda_vectorized(a)) + " " + launches();
}

std::string group_norm_silu(const Request& r) {
  namespace gn = fastdiff::group_norm_silu;
  gn::Args a;
  a.N = r.i64("N");
  a.C = r.i64("C");
  a.S = r.i64("S");
  a.groups = r.i64("groups");
  a.layout = static_cast<gn::Layout>(r.i64("layout"));
  a.dtype = static_cast<gn::DType>(r.i64("dtype"));
  a.x = r.ptr("x");
  a.residual = r.ptr("residual");
  a.out = r.ptr("out");
  a.weight = r.ptr("weight");
  a.weight_dtype = static_cast<gn::DType>(r.i64("weight_dtype"));
  a.weight_stride = r.i64("weight_stride", 1);
  a.bias = r.ptr("bias");
  a.bias_dtype = static_cast<gn::DType>(r.i64("bias_dtype"));
  a.bias_stride = r.i64("bias_stride", 1);
  a.temb = r.ptr("temb");
  a.temb_dtype = static_cast<gn::DType>(r.i64("temb_dtype"));
  a.temb_stride_n = r.i64("temb_stride_n");
  a.temb_stride_c = r.i64("temb_stride_c", 1);
  a.eps = static_cast<float>(r.num("eps", 1e-5));
  a.silu = r.i64("silu", 1) != 0;
  a.num_splits = static_cast<int>(r.i64("num_splits"));
  a.wide_index = r.i64("wide_index") != 0;
  // Exactly the size asked for, NaN-filled: ASan sees overruns, stale partials show.
  const size_t ws_bytes = gn::group_norm_silu_cuda_workspace_bytes(a);
  std::unique_ptr<float[]> ws(new float[ws_bytes / sizeof(float)]);
  std::fill_n(ws.get(), ws_bytes / sizeof(float), __uint_as_float(0x7fc00000u));
  const cudaError_t err = gn::group_norm_silu_cuda(a, ws.get(), ws_bytes, nullptr);
  if (err != cudaSuccess) throw std::runtime_error("cuda error " + std::to_string(err) + " " + cuda_on_cpu::last_error());
  return "splits=" + std::to_string(gn::group_norm_silu_cuda_splits(a)) + " workspace=" + std::to_string(ws_bytes) +
         " " + launches();
}

// Each thread writes its id to (static) shared memory, (optionally) __syncthreads, then reads
// its neighbour's: proves that the scheduler exposes a missing barrier. Replies the wrong reads.
void neighbour_kernel(int* wrong, bool sync) {
  __shared__ int s[1024];
  const unsigned t = threadIdx.x;
  s[t] = static_cast<int>(t);
  if (sync) __syncthreads();
  if (s[(t + 1) % blockDim.x] != static_cast<int>((t + 1) % blockDim.x)) ++*wrong;
}

// Butterfly warp sum (__shfl_xor_sync), a shift (__shfl_down_sync) and a broadcast
// (__shfl_sync), each checked by every lane.
void shuffle_kernel(int* wrong) {
  const unsigned lane = threadIdx.x % 32;
  unsigned v = lane + 1;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (v != 32 * 33 / 2) ++*wrong;
  const unsigned down = __shfl_down_sync(0xffffffffu, lane, 3);
  if (down != (lane + 3 < 32 ? lane + 3 : lane)) ++*wrong;
  if (__shfl_sync(0xffffffffu, lane * 7, 5) != 35) ++*wrong;
}

// Ballot, any/all, __syncwarp and atomics, each checked by every thread. total: the block's
// atomicAdd count; the last thread to arrive (atomicAdd's old value) checks max and CAS.
void warp_atomic_kernel(int* wrong, int* total) {
  __shared__ int s[3];
  const unsigned lane = threadIdx.x % 32, t = threadIdx.x;
  const unsigned lanes = blockDim.x - t / 32 * 32 < 32 ? blockDim.x - t / 32 * 32 : 32;
  const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  if (t == 0) s[0] = s[1] = s[2] = 0;
  __syncthreads();
  if (__ballot_sync(full, lane % 2) != (0xaaaaaaaau & full)) ++*wrong;
  if (!__any_sync(full, lane == 3) || __all_sync(full, lane < 31) != (lanes < 32)) ++*wrong;
  if (lane == 0) s[2] = static_cast<int>(t);
  __syncwarp(full);
  atomicMax(&s[1], static_cast<int>(t));
  atomicAdd(total, 1);
  if (atomicAdd(&s[0], 1) == static_cast<int>(blockDim.x) - 1) {
    const int m = s[1];
    if (m != static_cast<int>(blockDim.x) - 1 || atomicCAS(&s[1], m, -1) != m || s[1] != -1) ++*wrong;
  }
}

// Planted races for the race detector, by `mode`: 0 every warp leader adds to a shared total
// (read-modify-write); 1 the same with atomicAdd; 2 lane 0 writes what lane 1 then reads; 3 the
// same with __syncwarp between; 4 two threads write one global int. wrong: the total, if read.
void race_kernel(int* wrong, int* global, int mode) {
  int* s = fastdiff::dynamic_shared<int>();  // (2 ints; a static __shared__ int[2] at constant indices is not
                                             // instrumented by ASan, so not seen by the race detector)
  const unsigned lane = threadIdx.x % 32;
  if (threadIdx.x == 0) s[0] = s[1] = 0;
  __syncthreads();
  if (mode <= 1 && lane == 0) {
    if (mode == 0) s[0] += 1;
    else atomicAdd(&s[0], 1);
  }
  if (mode == 2 || mode == 3) {
    if (threadIdx.x == 0) s[1] = 7;
    if (mode == 3) __syncwarp();
    if (threadIdx.x == 1 && s[1] != 7) ++*wrong;
  }
  if (mode == 4 && threadIdx.x < 2) *global = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0 && mode <= 1 && s[0] != static_cast<int>(blockDim.x + 31) / 32) ++*wrong;
}

std::string selftest(const Request& r) {
  int wrong = 0, total = 0;
  const dim3 block(static_cast<unsigned>(r.i64("threads", 256)));
  using fastdiff::launch_kernel;
  cudaError_t err;
  if (r.op == "selftest_barrier") {
    err = launch_kernel(neighbour_kernel, dim3(2), block, 0, nullptr, &wrong, r.i64("sync") != 0);
  } else if (r.op == "selftest_warp") {
    err = launch_kernel(warp_atomic_kernel, dim3(3), block, 0, nullptr, &wrong, &total);
  } else if (r.op == "selftest_race") {
    const int mode = static_cast<int>(r.i64("mode"));
    err = launch_kernel(race_kernel, dim3(2), block, 2 * sizeof(int), nullptr, &wrong, &total, mode);
  } else {
    err = launch_kernel(shuffle_kernel, dim3(2), block, 0, nullptr, &wrong);
  }
  if (err != cudaSuccess) throw std::runtime_error("cuda error " + std::to_string(err) + " " + cuda_on_cpu::last_error());
  return "wrong=" + std::to_string(wrong) + " total=" + std::to_string(total);
}

}  // namespace

int main() {
  std::ios::sync_with_stdio(false);
  for (;;) {
    Request r;
    if (!read_request(r)) return 0;
    cuda_on_cpu::set_seed(static_cast<uint64_t>(r.i64("seed")));
    std::string reply;
    try {
      if (cudaSetDevice(static_cast<int>(r.i64("device"))) != cudaSuccess) {
        reply = "error no emulated device " + r.kv["device"];
      } else if (r.op == "solver_step") {
        reply = "ok " + solver_step(r);
      } else if (r.op == "group_norm_silu") {
        reply = "ok " + group_norm_silu(r);
      } else if (r.op.rfind("selftest_", 0) == 0) {
        reply = "ok " + selftest(r);
      } else {
        reply = "error unknown op " + r.op;
      }
    } catch (const std::exception& e) {
      reply = std::string("error ") + e.what();
    }
    std::cout << reply << '\n';
    if (reply.rfind("ok", 0) == 0) {
      for (const std::string& k : r.order) std::cout.write(r.bufs.at(k).data(), r.bufs.at(k).bytes);
    }
    std::cout.flush();
    cuda_on_cpu::take_launches();
  }
}
