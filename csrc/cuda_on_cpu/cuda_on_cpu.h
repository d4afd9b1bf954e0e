// cuda_on_cpu -- just enough CUDA semantics to run fastdiff's .cu kernels, unchanged, on the CPU
// (tests only; compile the .cu as C++ with -x c++ -I csrc/cuda_on_cpu/include, whose
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h shims include this file).
//
// The threads of a block are fibers on one OS thread; blocks run one after another in a seeded
// random order. Between two synchronisation points the runnable threads of a block run in a
// fresh seeded random order, so code that relies on an order the hardware does not promise (a
// missing __syncthreads) reads poisoned or stale shared memory. __syncthreads is a barrier of
// every thread of the block, a warp shuffle one of all 32 lanes of the warp; a thread that
// reaches a different barrier than its peers, or exits while they wait, fails the launch.
// Dynamic shared memory is a separate allocation of exactly the launch's size (AddressSanitizer
// sees overruns), filled with 0xff bytes (NaN) before each block. Static __shared__ variables
// are function statics in their own ELF section, which is filled the same way before each block
// (blocks never overlap, so one copy serves them all).
// `extern __shared__` does not compile here: kernels use fastdiff::dynamic_shared<T>().
// Data races: two threads of a block touching one byte between the same two barriers (one of
// them writing, not ordered by a warp synchronisation) fail the launch, naming the kernel, the
// address and both threads (cuda_on_cpu.cc, Races). Not seen: accesses ASan proves in bounds
// and so does not instrument (a static __shared__ array at constant indices), atomics.
// Devices: kDevices (an H100 with 132 SMs, and a 1-SM device), picked with cudaSetDevice.
// Not modelled: timing, concurrency between blocks, the memory model, fast-math rounding.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/half_convert.h"

#define CUDA_ON_CPU 1

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))

// ---- built-in types and variables ---------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

// One set for the whole process: only the running fiber reads them, and the scheduler sets
// them before it resumes a fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ---- runtime API subset ---------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

// The runtime's own values.
enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

typedef struct CUstream_st* cudaStream_t;

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();

namespace cuda_on_cpu {

// The emulated devices, as the launch code sees them (cudaDeviceGetAttribute). Device 0 is an
// H100 SXM; device 1 has one multiprocessor, so that grid-size caps and grid-stride loops take
// effect at small test sizes.
struct Device {
  const char* name;
  int multiprocessors;
  size_t smem_per_block;        // what a launch gets without cudaFuncSetAttribute opt-in
  size_t smem_per_block_optin;  // the most a kernel can opt in to
  size_t smem_per_multiprocessor;
};
constexpr Device kDevices[] = {
    {"H100 SXM", 132, 48 * 1024, 227 * 1024, 228 * 1024},
    {"one-SM test device", 1, 48 * 1024, 227 * 1024, 228 * 1024},
};
constexpr int kDeviceCount = sizeof(kDevices) / sizeof(kDevices[0]);

struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
  size_t smem;
};

void set_seed(uint64_t seed);
// Launches since the last call (and clears the list).
std::vector<LaunchRecord> take_launches();
// The last failed launch's reason ("" after a good one).
const std::string& last_error();

// Runs body once per thread of every block of the grid; see the top of this file.
cudaError_t run_grid(const void* kernel, const cudaLaunchConfig_t& cfg, const std::function<void()>& body);

void* dynamic_shared();
// Waits for every thread of the block.
void block_barrier();
// Waits for every lane of the calling thread's warp; returns lane src_lane's `value`.
uint64_t warp_exchange(unsigned mask, uint64_t value, unsigned src_lane);
// Waits for every lane of the calling thread's warp; returns the bits of the lanes whose
// `pred` is non-zero.
unsigned warp_ballot(unsigned mask, int pred);
// Lane of the calling thread within its warp.
unsigned lane_id();
// A load or store of the running kernel thread, for the race detector (cuda_on_cpu.cc).
void track_access(uintptr_t a, size_t n, bool write);
void track_atomic(uintptr_t a, size_t n);

template <typename T>
T shuffle(unsigned mask, T v, unsigned src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  bits = warp_exchange(mask, bits, src_lane);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace cuda_on_cpu

// Like the CUDA runtime's own template: the arguments are converted to the kernel's parameter
// types once, and every thread gets a copy.
template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  std::tuple<std::decay_t<ExpTypes>...> params(std::forward<ActTypes>(args)...);
  return cuda_on_cpu::run_grid(reinterpret_cast<const void*>(kernel), *config, [&] { std::apply(kernel, params); });
}

// ---- device functions -------------------------------------------------------------------------

inline void __syncthreads() { cuda_on_cpu::block_barrier(); }

// Out-of-segment sources return the caller's own value, as on the GPU.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned lane = cuda_on_cpu::lane_id(), seg = lane / width * width;
  return cuda_on_cpu::shuffle(mask, v, seg + unsigned(src) % width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = cuda_on_cpu::lane_id();
  return cuda_on_cpu::shuffle(mask, v, lane % width + delta < unsigned(width) ? lane + delta : lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = cuda_on_cpu::lane_id(), src = lane ^ unsigned(lane_mask);
  return cuda_on_cpu::shuffle(mask, v, src / width <= lane / width ? src : lane);
}

// A warp barrier: every lane of the warp, with the full mask (as the shuffles).
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_on_cpu::warp_ballot(mask, 0); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return cuda_on_cpu::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return cuda_on_cpu::warp_ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return cuda_on_cpu::warp_ballot(mask, !pred) == 0; }

// Atomics: a thread runs uninterrupted until its next barrier, so any read-modify-write is
// atomic here; these are defined out of line, in cuda_on_cpu.cc, where the race detector does
// not see them (an atomic never races). Others do not compile ("was not declared").
float atomicAdd(float* p, float v);
int atomicAdd(int* p, int v);
unsigned atomicAdd(unsigned* p, unsigned v);
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v);
int atomicMax(int* p, int v);
int atomicMin(int* p, int v);
int atomicExch(int* p, int v);
float atomicExch(float* p, float v);
int atomicCAS(int* p, int compare, int v);
unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v);
unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v);

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline float __uint_as_float(unsigned u) { return fastdiff::bits_to_float(u); }
inline unsigned __float_as_uint(float f) { return fastdiff::float_to_bits(f); }
// The GPU computes __expf as ex2.approx(x * log2 e); the product's rounding is its main error,
// kept here. rsqrtf is approximate on the GPU too (2 ulp); here it is exact.
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ---- fp16 / bf16 --------------------------------------------------------------------------------
// Round to nearest even, as cvt.rn; NaN becomes the canonical 0x7fff, as on the GPU.

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) { return fastdiff::half_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{f != f ? uint16_t(0x7fff) : fastdiff::float_to_half(f)}; }

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 h) { return fastdiff::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{f != f ? uint16_t(0x7fff) : fastdiff::float_to_bf16(f)};
}
