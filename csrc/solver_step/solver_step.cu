// fastdiff::solver_step -- CUDA kernel. Torch-free: raw pointers and sizes only (contract in
// solver_step.h), compiled by nvcc alone in CI (CMake target fastdiff_cuda_kernels).
//
// One grid-stride loop over the flat range. Fast path: every pointer 16-byte aligned, each
// thread moves VEC elements per buffer with 16-byte loads/stores (VEC = 16 / smallest element
// size, so an fp32 buffer next to an fp16 one takes two 16-byte accesses); the last
// numel % VEC elements go through the scalar code. Otherwise the whole range is scalar.
// fp32 arithmetic, 64-bit indices.
#include "solver_step.cuh"
#include "../common/cuda_util.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastdiff {
namespace solver_step {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSM = 2048 / kThreads;  // enough resident threads to hide latency

struct Params {
  const void* x;
  const void* model;
  const void* uncond;
  const void* hist[3];
  const void* noise;
  void* out;
  void* hist_write;
  int64_t numel;
  float p, q, a, r, b0, b[3], c, w, bound;  // r: weight of the unclamped D; bound: clamp (<= 0: none)
  const float* w_ptr;  // nullptr: use w
};

template <DType T>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  static constexpr int kSize = 4;
};
template <>
struct Elem<DType::kFloat16> {
  static constexpr int kSize = 2;
};
template <>
struct Elem<DType::kBFloat16> {
  static constexpr int kSize = 2;
};

// 32-bit word <-> floats it holds (little-endian: the lower address is the low half).
template <DType T>
__device__ __forceinline__ void unpack(uint32_t w, float* v);
template <>
__device__ __forceinline__ void unpack<DType::kFloat32>(uint32_t w, float* v) {
  v[0] = __uint_as_float(w);
}
template <>
__device__ __forceinline__ void unpack<DType::kFloat16>(uint32_t w, float* v) {
  v[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  v[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <>
__device__ __forceinline__ void unpack<DType::kBFloat16>(uint32_t w, float* v) {
  v[0] = __uint_as_float(w << 16);
  v[1] = __uint_as_float(w & 0xffff0000u);
}

template <DType T>
__device__ __forceinline__ uint32_t pack(const float* v);
template <>
__device__ __forceinline__ uint32_t pack<DType::kFloat32>(const float* v) {
  return __float_as_uint(v[0]);
}
template <>
__device__ __forceinline__ uint32_t pack<DType::kFloat16>(const float* v) {
  const uint32_t lo = __half_as_ushort(__float2half_rn(v[0]));
  const uint32_t hi = __half_as_ushort(__float2half_rn(v[1]));
  return lo | (hi << 16);
}
template <>
__device__ __forceinline__ uint32_t pack<DType::kBFloat16>(const float* v) {
  const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(v[0]));
  const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(v[1]));
  return lo | (hi << 16);
}

template <DType T>
__device__ __forceinline__ float load1(const void* base, int64_t i) {
  if constexpr (T == DType::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == DType::kFloat16) {
    return __half2float(static_cast<const __half*>(base)[i]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
}

template <DType T>
__device__ __forceinline__ void store1(void* base, int64_t i, float v) {
  if constexpr (T == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (T == DType::kFloat16) {
    static_cast<__half*>(base)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  }
}

// VEC elements starting at element i (i * size is a multiple of 16 when VEC > 1).
template <DType T, int VEC>
__device__ __forceinline__ void load(const void* base, int64_t i, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = load1<T>(base, i);
  } else {
    constexpr int kPerWord = 4 / Elem<T>::kSize;
    constexpr int kChunks = VEC * Elem<T>::kSize / 16;
    static_assert(VEC * Elem<T>::kSize % 16 == 0, "vector must be a whole number of 16-byte chunks");
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + i * Elem<T>::kSize);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const uint4 w = p[k];
      unpack<T>(w.x, &v[(4 * k + 0) * kPerWord]);
      unpack<T>(w.y, &v[(4 * k + 1) * kPerWord]);
      unpack<T>(w.z, &v[(4 * k + 2) * kPerWord]);
      unpack<T>(w.w, &v[(4 * k + 3) * kPerWord]);
    }
  }
}

template <DType T, int VEC>
__device__ __forceinline__ void store(void* base, int64_t i, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    store1<T>(base, i, v[0]);
  } else {
    constexpr int kPerWord = 4 / Elem<T>::kSize;
    constexpr int kChunks = VEC * Elem<T>::kSize / 16;
    uint4* p = reinterpret_cast<uint4*>(static_cast<char*>(base) + i * Elem<T>::kSize);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      uint4 w;
      w.x = pack<T>(&v[(4 * k + 0) * kPerWord]);
      w.y = pack<T>(&v[(4 * k + 1) * kPerWord]);
      w.z = pack<T>(&v[(4 * k + 2) * kPerWord]);
      w.w = pack<T>(&v[(4 * k + 3) * kPerWord]);
      p[k] = w;
    }
  }
}

// VEC elements from index i. All loads of these elements happen before any store, so
// out == x and hist_write == hist[k] are safe (no __restrict__ anywhere for that reason).
template <DType TM, DType TS, int VEC>
__device__ __forceinline__ void step(const Params& P, float w, int64_t i) {
  float m[VEC], x[VEC], d[VEC], acc[VEC], t[VEC];
  load<TM, VEC>(P.model, i, m);
  if (P.uncond != nullptr) {
    load<TM, VEC>(P.uncond, i, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = t[j] + w * (m[j] - t[j]);
  }
  load<TS, VEC>(P.x, i, x);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float dj = P.p * x[j] + P.q * m[j];
    float dc = dj;
    if (P.bound > 0.0f) dc = dj < -P.bound ? -P.bound : (dj > P.bound ? P.bound : dj);  // NaN propagates
    d[j] = dc;
    acc[j] = P.a * x[j] + P.r * dj + P.b0 * dc;
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (P.hist[k] != nullptr) {
      load<TS, VEC>(P.hist[k], i, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += P.b[k] * t[j];
    }
  }
  if (P.noise != nullptr) {
    load<TS, VEC>(P.noise, i, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += P.c * t[j];
  }
  store<TS, VEC>(P.out, i, acc);
  if (P.hist_write != nullptr) store<TS, VEC>(P.hist_write, i, d);
}

template <DType TM, DType TS, int VEC>
__global__ void __launch_bounds__(kThreads) solver_step_kernel(const Params P) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = P.numel / VEC;
  const float w = P.w_ptr != nullptr ? __ldg(P.w_ptr) : P.w;  // one cached load per thread
  for (int64_t v = tid; v < nvec; v += stride) step<TM, TS, VEC>(P, w, v * VEC);
  if constexpr (VEC > 1) {
    const int64_t i = nvec * VEC + tid;  // scalar tail: fewer than VEC elements
    if (i < P.numel) step<TM, TS, 1>(P, w, i);
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <DType TM, DType TS>
cudaError_t launch(const Params& P, bool vectorized, cudaStream_t stream) {
  constexpr int kVec = 16 / (Elem<TM>::kSize < Elem<TS>::kSize ? Elem<TM>::kSize : Elem<TS>::kSize);
  const int64_t work = vectorized ? (P.numel + kVec - 1) / kVec : P.numel;
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * kMaxBlocksPerSM;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  const dim3 grid(static_cast<unsigned>(blocks));
  return vectorized ? launch_kernel(solver_step_kernel<TM, TS, kVec>, grid, kThreads, 0, stream, P)
                    : launch_kernel(solver_step_kernel<TM, TS, 1>, grid, kThreads, 0, stream, P);
}

}  // namespace

bool solver_step_cuda_vectorized(const Args& a) {
  return aligned16(a.x) && aligned16(a.model) && aligned16(a.uncond) && aligned16(a.hist_read[0]) &&
         aligned16(a.hist_read[1]) && aligned16(a.hist_read[2]) && aligned16(a.noise) && aligned16(a.out) &&
         aligned16(a.hist_write);
}

cudaError_t solver_step_cuda(const Args& a, cudaStream_t stream) {
  if (check_args(a) != nullptr) return cudaErrorInvalidValue;
  if (a.numel == 0) return cudaSuccess;
  Params P;
  P.x = a.x;
  P.model = a.model;
  P.uncond = a.uncond;
  for (int k = 0; k < 3; ++k) P.hist[k] = a.hist_read[k];
  P.noise = a.noise;
  P.out = a.out;
  P.hist_write = a.hist_write;
  P.numel = a.numel;
  P.p = a.coef[kP];
  P.q = a.coef[kQ];
  P.a = a.coef[kA];
  P.b0 = a.coef[kB0];
  P.b[0] = a.coef[kB1];
  P.b[1] = a.coef[kB2];
  P.b[2] = a.coef[kB3];
  P.c = a.coef[kC];
  P.r = a.coef[kR];
  P.w = a.guidance;
  P.w_ptr = a.guidance_ptr;
  P.bound = a.clamp;
  const bool vec = solver_step_cuda_vectorized(a);
  const bool fp32_state = a.state_dtype == DType::kFloat32;
  switch (a.model_dtype) {
    case DType::kFloat32:
      return launch<DType::kFloat32, DType::kFloat32>(P, vec, stream);
    case DType::kFloat16:
      return fp32_state ? launch<DType::kFloat16, DType::kFloat32>(P, vec, stream)
                        : launch<DType::kFloat16, DType::kFloat16>(P, vec, stream);
    case DType::kBFloat16:
      return fp32_state ? launch<DType::kBFloat16, DType::kFloat32>(P, vec, stream)
                        : launch<DType::kBFloat16, DType::kBFloat16>(P, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace solver_step
}  // namespace fastdiff
