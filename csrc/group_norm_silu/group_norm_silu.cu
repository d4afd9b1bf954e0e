// fastdiff::group_norm_silu -- CUDA kernels. Torch-free: raw pointers and sizes only (contract
// in group_norm_silu.h), compiled by nvcc alone in CI (CMake target fastdiff_cuda_kernels).
//
// A group is the row-major matrix [R, K] of group_norm_silu.h; element e of it lives at
// group_base + (e / K) * row_stride + e % K (a fast 32-bit divmod when the group has < 2^31
// elements). Each thread moves VEC elements per access (16-byte vectors when K, the strides and
// every pointer allow; VEC never crosses a row because VEC divides K), kUnroll accesses in
// flight per step.
//
//   group_norm_silu_fused_kernel    one block per group (no split): statistics, then normalise.
//                                   When the group fits in registers (CACHED: kCacheVecs vectors
//                                   per thread) x is read once; otherwise twice (L2).
//   group_norm_silu_stats_kernel    split groups, grid (groups, chunks): (n, mean, M2, x0) of a
//                                   chunk into the workspace
//   group_norm_silu_apply_kernel    split groups: merge the group's partials, normalise a chunk
//
// Statistics: per thread, each step's kUnroll * VEC values of d = (x - x0) + temb offset get an
// exact two-pass mean/M2 and are merged into the thread's (n, mean, M2) with Chan's formula;
// warps and the block merge the same way (shuffles, then shared memory). fp32 throughout,
// 64-bit offsets. Per-channel scale/shift/offsets live in shared memory (3 * C/G floats).
#include "group_norm_silu.cuh"
#include "../common/cuda_util.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastdiff {
namespace group_norm_silu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;      // vector accesses per thread per step
constexpr int kCacheVecs = 4;   // vectors per thread a fused block keeps in registers
constexpr int kBlocksPerSM = 4;  // what the automatic split aims for
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxSplits = 65535;  // gridDim.y

template <DType T>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using type = float;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Elem<DType::kFloat16> {
  using type = __half;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<DType::kBFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};

__device__ __forceinline__ float load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// n / d for n < 2^31 with a multiply-high and a shift (d >= 1, d < 2^31):
// shift = ceil(log2 d), mul = floor(2^32 (2^shift - d) / d) + 1, n / d = (umulhi(n, mul) + n) >> shift.
struct FastDiv {
  uint32_t mul = 1, shift = 0;
  void init(uint32_t d) {
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, mul) + n) >> shift; }
};

struct Params {
  const void* x;
  const void* res;
  void* out;
  const void* w;
  const void* b;
  const void* t;
  DType wt, bt, tt;
  int64_t w_stride, b_stride, t_sn, t_sc;
  int64_t groups;  // G
  int64_t cpg, rows, cols, row_stride, sample_stride, group_stride, size;
  int64_t chunk, splits;
  float eps;
  bool cl, silu, small;  // small: size < 2^31 (FastDiv applies)
  FastDiv div_cols;
  float* part;  // [N * G][splits][4]: n, mean, M2, x0
};

__device__ __forceinline__ void row_col(const Params& P, int64_t e, int64_t& r, int64_t& k) {
  if (P.small) {
    const uint32_t q = P.div_cols.div(static_cast<uint32_t>(e));
    r = q;
    k = e - static_cast<int64_t>(q) * P.cols;
  } else {
    r = e / P.cols;
    k = e - r * P.cols;
  }
}

// Chan et al.: merge (nb, mb, m2b) into (n, mean, m2); a no-op for an empty right side.
__device__ __forceinline__ void merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  if (nb > 0.0f) {
    const float nn = n + nb;
    const float f = nb / nn;
    const float delta = mb - mean;
    mean += delta * f;
    m2 += m2b + delta * delta * n * f;
    n = nn;
  }
}

__device__ __forceinline__ void warp_merge(float& n, float& mean, float& m2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_down_sync(0xffffffffu, n, o);
    const float mb = __shfl_down_sync(0xffffffffu, mean, o);
    const float m2b = __shfl_down_sync(0xffffffffu, m2, o);
    merge(n, mean, m2, nb, mb, m2b);
  }
}

// Merge every thread's statistics; all threads get the block's. `sh` holds 3 * (kWarps + 1).
__device__ __forceinline__ void block_merge(float& n, float& mean, float& m2, float* sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_merge(n, mean, m2);
  if (lane == 0) {
    sh[3 * warp] = n;
    sh[3 * warp + 1] = mean;
    sh[3 * warp + 2] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    n = lane < kWarps ? sh[3 * lane] : 0.0f;
    mean = lane < kWarps ? sh[3 * lane + 1] : 0.0f;
    m2 = lane < kWarps ? sh[3 * lane + 2] : 0.0f;
    warp_merge(n, mean, m2);
    if (lane == 0) {
      sh[3 * kWarps] = n;
      sh[3 * kWarps + 1] = mean;
      sh[3 * kWarps + 2] = m2;
    }
  }
  __syncthreads();
  n = sh[3 * kWarps];
  mean = sh[3 * kWarps + 1];
  m2 = sh[3 * kWarps + 2];
}

__device__ __forceinline__ int64_t group_base(const Params& P, int64_t ng) {
  const int64_t n = ng / P.groups;
  return n * P.sample_stride + (ng - n * P.groups) * P.group_stride;
}

// s_off[c] = temb[n][c0 + c] - temb[n][c0] (0 without temb). Ends with __syncthreads.
__device__ void load_offsets(const Params& P, int64_t ng, float* s_off) {
  if (P.t != nullptr) {
    const int64_t n = ng / P.groups, c0 = (ng - n * P.groups) * P.cpg;
    const int64_t row = n * P.t_sn;
    const float t0 = load_any(P.t, P.tt, row + c0 * P.t_sc);
    for (int64_t c = threadIdx.x; c < P.cpg; c += kThreads) s_off[c] = load_any(P.t, P.tt, row + (c0 + c) * P.t_sc) - t0;
  } else {
    for (int64_t c = threadIdx.x; c < P.cpg; c += kThreads) s_off[c] = 0.0f;
  }
  __syncthreads();
}

// s_scale/s_shift of the group's channels from its statistics. Ends with __syncthreads.
__device__ void load_affine(const Params& P, int64_t ng, float n, float mean, float m2, const float* s_off,
                            float* s_scale, float* s_shift) {
  const int64_t c0 = (ng % P.groups) * P.cpg;
  const float var = fmaxf(m2 / n, 0.0f);
  const float rstd = rsqrtf(var + P.eps);
  for (int64_t c = threadIdx.x; c < P.cpg; c += kThreads) {
    const float wc = P.w != nullptr ? load_any(P.w, P.wt, (c0 + c) * P.w_stride) : 1.0f;
    const float bc = P.b != nullptr ? load_any(P.b, P.bt, (c0 + c) * P.b_stride) : 0.0f;
    const float sc = rstd * wc;
    s_scale[c] = sc;
    s_shift[c] = bc + (s_off[c] - mean) * sc;
  }
  __syncthreads();
}

// x - x0 of the VEC elements at group element e; `off` receives their element offset, `c`
// the group-local channel of the first (channels-last: consecutive channels; else all one).
template <DType T, int VEC>
__device__ __forceinline__ void load_centered(const Params& P, int64_t base, int64_t e, float x0, float (&v)[VEC],
                                              int64_t& off, int32_t& c) {
  using S = typename Elem<T>::type;
  int64_t r, k;
  row_col(P, e, r, k);
  off = base + r * P.row_stride + k;
  c = static_cast<int32_t>(P.cl ? k : r);
  const Pack<S, VEC> p = *reinterpret_cast<const Pack<S, VEC>*>(static_cast<const S*>(P.x) + off);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = Elem<T>::to_float(p.v[j]) - x0;
}

// Exact two-pass mean/M2 of the first `m` vectors of v (+ offsets), merged into the thread's.
template <int VEC, int M>
__device__ __forceinline__ void merge_values(const Params& P, const float (&v)[M][VEC], const int32_t (&c)[M], int m,
                                             const float* s_off, float& n, float& mean, float& m2) {
  if (m == 0) return;
  float d[M][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int u = 0; u < M; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      d[u][j] = u < m ? v[u][j] + s_off[P.cl ? c[u] + j : c[u]] : 0.0f;
      sum += d[u][j];
    }
  }
  const float cnt = static_cast<float>(m * VEC);
  const float bmean = sum / cnt;
  float bm2 = 0.0f;
#pragma unroll
  for (int u = 0; u < M; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float e = d[u][j] - bmean;
      bm2 += u < m ? e * e : 0.0f;
    }
  }
  merge(n, mean, m2, cnt, bmean, bm2);
}

// Thread statistics over the group elements [e0, e1) (both multiples of VEC).
template <DType T, int VEC>
__device__ void chunk_stats(const Params& P, int64_t base, float x0, const float* s_off, int64_t e0, int64_t e1,
                            float& n, float& mean, float& m2) {
  constexpr int64_t kStep = int64_t(kThreads) * VEC;
  for (int64_t eb = e0 + int64_t(threadIdx.x) * VEC; eb < e1; eb += kStep * kUnroll) {
    float v[kUnroll][VEC];
    int64_t off[kUnroll];
    int32_t c[kUnroll];
    int m = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = eb + u * kStep;
      if (e < e1) {
        load_centered<T, VEC>(P, base, e, x0, v[u], off[u], c[u]);
        m = u + 1;
      } else {
        off[u] = 0;
        c[u] = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[u][j] = 0.0f;
      }
    }
    merge_values<VEC, kUnroll>(P, v, c, m, s_off, n, mean, m2);
  }
}

// out = act((x - x0) * scale + shift) + residual for the VEC centred values v at element
// offset `off`, group-local channel `c0` (see load_centered).
template <DType T, int VEC>
__device__ __forceinline__ void store_out(const Params& P, int64_t off, int32_t c0, const float (&v)[VEC],
                                          const float* s_scale, const float* s_shift) {
  using S = typename Elem<T>::type;
  float res[VEC] = {};
  if (P.res != nullptr) {
    const Pack<S, VEC> p = *reinterpret_cast<const Pack<S, VEC>*>(static_cast<const S*>(P.res) + off);
#pragma unroll
    for (int j = 0; j < VEC; ++j) res[j] = Elem<T>::to_float(p.v[j]);
  }
  Pack<S, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int32_t c = P.cl ? c0 + j : c0;
    float y = v[j] * s_scale[c] + s_shift[c];
    if (P.silu) y = y / (1.0f + __expf(-y));  // y * sigmoid(y); -> -0 as y -> -inf
    if (P.res != nullptr) y += res[j];
    o.v[j] = Elem<T>::from_float(y);
  }
  *reinterpret_cast<Pack<S, VEC>*>(static_cast<S*>(P.out) + off) = o;
}

// Normalise the group elements [e0, e1), reading x again.
template <DType T, int VEC>
__device__ void chunk_apply(const Params& P, int64_t base, float x0, const float* s_scale, const float* s_shift,
                            int64_t e0, int64_t e1) {
  constexpr int64_t kStep = int64_t(kThreads) * VEC;
  for (int64_t eb = e0 + int64_t(threadIdx.x) * VEC; eb < e1; eb += kStep * kUnroll) {
    float v[kUnroll][VEC];
    int64_t off[kUnroll];
    int32_t c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll accesses in flight
      const int64_t e = eb + u * kStep;
      if (e < e1) load_centered<T, VEC>(P, base, e, x0, v[u], off[u], c[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (eb + u * kStep < e1) store_out<T, VEC>(P, off[u], c[u], v[u], s_scale, s_shift);
    }
  }
}

// Shared memory of every kernel: block_merge scratch, then off/scale/shift per channel.
struct Smem {
  float* merge;
  float* off;
  float* scale;
  float* shift;
};

__device__ __forceinline__ Smem smem_layout(float* dyn, int64_t cpg) {
  return Smem{dyn, dyn + 3 * (kWarps + 1), dyn + 3 * (kWarps + 1) + cpg, dyn + 3 * (kWarps + 1) + 2 * cpg};
}

// Reads happen before writes everywhere (x0 before the block's first store, each element loaded
// before it is stored by the same thread): out may alias x or residual. No __restrict__.
// Min. 2 blocks per SM: without it ptxas (CUDA 13) caps the sm_80 VEC=2 streamed variant at 80
// registers and spills; with it every variant fits in <= 128 registers without spilling
// (tests/test_cuda_resources.py).
template <DType T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kThreads, 2) group_norm_silu_fused_kernel(const Params P) {
  const Smem sm = smem_layout(dynamic_shared<float>(), P.cpg);
  const int64_t ng = blockIdx.x;
  const int64_t base = group_base(P, ng);
  const float x0 = Elem<T>::to_float(static_cast<const typename Elem<T>::type*>(P.x)[base]);
  load_offsets(P, ng, sm.off);  // (its __syncthreads also orders every x0 read before any store)
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if constexpr (CACHED) {
    // group size <= kThreads * kCacheVecs * VEC: one read, values kept in registers
    constexpr int64_t kStep = int64_t(kThreads) * VEC;
    float v[kCacheVecs][VEC];
    int64_t off[kCacheVecs];
    int32_t c[kCacheVecs];
    int m = 0;
#pragma unroll
    for (int u = 0; u < kCacheVecs; ++u) {
      const int64_t e = int64_t(threadIdx.x) * VEC + u * kStep;
      if (e < P.size) {
        load_centered<T, VEC>(P, base, e, x0, v[u], off[u], c[u]);
        m = u + 1;
      } else {
        off[u] = 0;
        c[u] = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[u][j] = 0.0f;
      }
    }
    merge_values<VEC, kCacheVecs>(P, v, c, m, sm.off, n, mean, m2);
    block_merge(n, mean, m2, sm.merge);
    load_affine(P, ng, n, mean, m2, sm.off, sm.scale, sm.shift);
#pragma unroll
    for (int u = 0; u < kCacheVecs; ++u) {
      if (u < m) store_out<T, VEC>(P, off[u], c[u], v[u], sm.scale, sm.shift);
    }
  } else {
    chunk_stats<T, VEC>(P, base, x0, sm.off, 0, P.size, n, mean, m2);
    block_merge(n, mean, m2, sm.merge);
    load_affine(P, ng, n, mean, m2, sm.off, sm.scale, sm.shift);
    chunk_apply<T, VEC>(P, base, x0, sm.scale, sm.shift, 0, P.size);
  }
}

template <DType T, int VEC>
__global__ void __launch_bounds__(kThreads) group_norm_silu_stats_kernel(const Params P) {
  const Smem sm = smem_layout(dynamic_shared<float>(), P.cpg);
  const int64_t ng = blockIdx.x, s = blockIdx.y;
  const int64_t base = group_base(P, ng);
  const float x0 = Elem<T>::to_float(static_cast<const typename Elem<T>::type*>(P.x)[base]);
  load_offsets(P, ng, sm.off);
  const int64_t e0 = s * P.chunk;
  const int64_t e1 = e0 + P.chunk < P.size ? e0 + P.chunk : P.size;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  chunk_stats<T, VEC>(P, base, x0, sm.off, e0, e1, n, mean, m2);
  block_merge(n, mean, m2, sm.merge);
  if (threadIdx.x == 0) {
    float* p = P.part + (ng * P.splits + s) * 4;
    p[0] = n;
    p[1] = mean;
    p[2] = m2;
    p[3] = x0;
  }
}

template <DType T, int VEC>
__global__ void __launch_bounds__(kThreads) group_norm_silu_apply_kernel(const Params P) {
  const Smem sm = smem_layout(dynamic_shared<float>(), P.cpg);
  const int64_t ng = blockIdx.x, s = blockIdx.y;
  const int64_t base = group_base(P, ng);
  const float* part = P.part + ng * P.splits * 4;
  const float x0 = part[3];  // from the workspace: another block may already have written x[base]
  load_offsets(P, ng, sm.off);
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if (threadIdx.x < 32) {
    for (int64_t j = threadIdx.x; j < P.splits; j += 32) merge(n, mean, m2, part[4 * j], part[4 * j + 1], part[4 * j + 2]);
  }
  block_merge(n, mean, m2, sm.merge);  // threads outside warp 0 contribute empty statistics
  load_affine(P, ng, n, mean, m2, sm.off, sm.scale, sm.shift);
  const int64_t e0 = s * P.chunk;
  const int64_t e1 = e0 + P.chunk < P.size ? e0 + P.chunk : P.size;
  chunk_apply<T, VEC>(P, base, x0, sm.scale, sm.shift, e0, e1);
}

bool aligned(const void* p, int bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Largest VEC (elements per access, up to 16 bytes) that divides the row length and every
// stride and to which every pointer is aligned.
int pick_vec(const Args& a, const Geometry& g) {
  const int esize = dtype_size(a.dtype);
  for (int vec = 16 / esize; vec > 1; vec /= 2) {
    if (g.cols % vec == 0 && g.row_stride % vec == 0 && g.group_stride % vec == 0 && g.sample_stride % vec == 0 &&
        aligned(a.x, vec * esize) && aligned(a.out, vec * esize) && aligned(a.residual, vec * esize)) {
      return vec;
    }
  }
  return 1;
}

struct Plan {
  int vec;
  int64_t splits, chunk;
};

Plan make_plan(const Args& a) {
  const Geometry g = geometry(a);
  Plan p;
  p.vec = pick_vec(a, g);
  const int64_t groups = a.N * a.groups;
  const int64_t vecs = (g.size + p.vec - 1) / p.vec;  // chunks are whole vectors
  int64_t splits;
  if (a.num_splits > 0) {
    splits = a.num_splits;
  } else {
    const int64_t target = int64_t(kBlocksPerSM) * sm_count();
    splits = groups >= target ? 1 : (target + groups - 1) / groups;
    const int64_t by_size = g.size / kMinChunk;
    if (splits > by_size) splits = by_size;
  }
  if (splits > vecs) splits = vecs;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  p.chunk = ((vecs + splits - 1) / splits) * p.vec;
  p.splits = p.chunk > 0 ? (g.size + p.chunk - 1) / p.chunk : 1;
  return p;
}

template <DType T, int VEC>
cudaError_t launch(const Params& P, int64_t groups, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(3 * (kWarps + 1) + 3 * P.cpg);
  if (P.splits == 1) {
    const dim3 grid(static_cast<unsigned>(groups));
    return P.size <= int64_t(kThreads) * kCacheVecs * VEC
               ? launch_kernel(group_norm_silu_fused_kernel<T, VEC, true>, grid, kThreads, smem, stream, P)
               : launch_kernel(group_norm_silu_fused_kernel<T, VEC, false>, grid, kThreads, smem, stream, P);
  }
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(P.splits));
  const cudaError_t err = launch_kernel(group_norm_silu_stats_kernel<T, VEC>, grid, kThreads, smem, stream, P);
  if (err != cudaSuccess) return err;
  return launch_kernel(group_norm_silu_apply_kernel<T, VEC>, grid, kThreads, smem, stream, P);
}

template <DType T>
cudaError_t launch_vec(const Params& P, int vec, int64_t groups, cudaStream_t stream) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(typename Elem<T>::type) == 2) return launch<T, 8>(P, groups, stream);
      break;
    case 4: return launch<T, 4>(P, groups, stream);
    case 2: return launch<T, 2>(P, groups, stream);
    default: return launch<T, 1>(P, groups, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t group_norm_silu_cuda_splits(const Args& a) { return make_plan(a).splits; }

size_t group_norm_silu_cuda_workspace_bytes(const Args& a) {
  if (check_cuda_args(a) != nullptr || numel(a) == 0) return 0;
  const Plan p = make_plan(a);
  return p.splits > 1 ? sizeof(float) * 4 * static_cast<size_t>(a.N * a.groups * p.splits) : 0;
}

cudaError_t group_norm_silu_cuda(const Args& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (check_cuda_args(a) != nullptr) return cudaErrorInvalidValue;
  if (numel(a) == 0) return cudaSuccess;
  const Geometry g = geometry(a);
  const Plan plan = make_plan(a);
  const int64_t groups = a.N * a.groups;
  if (groups > 0x7fffffff) return cudaErrorInvalidValue;
  if (plan.splits > 1) {
    const size_t need = sizeof(float) * 4 * static_cast<size_t>(groups * plan.splits);
    if (workspace == nullptr || workspace_bytes < need || !aligned(workspace, 16)) return cudaErrorInvalidValue;
  }
  Params P;
  P.x = a.x;
  P.res = a.residual;
  P.out = a.out;
  P.w = a.weight;
  P.b = a.bias;
  P.t = a.temb;
  P.wt = a.weight_dtype;
  P.bt = a.bias_dtype;
  P.tt = a.temb_dtype;
  P.w_stride = a.weight_stride;
  P.b_stride = a.bias_stride;
  P.t_sn = a.temb_stride_n;
  P.t_sc = a.temb_stride_c;
  P.groups = a.groups;
  P.cpg = g.cpg;
  P.rows = g.rows;
  P.cols = g.cols;
  P.row_stride = g.row_stride;
  P.sample_stride = g.sample_stride;
  P.group_stride = g.group_stride;
  P.size = g.size;
  P.chunk = plan.chunk;
  P.splits = plan.splits;
  P.eps = a.eps;
  P.cl = a.layout == Layout::kNSC;
  P.silu = a.silu;
  P.small = !a.wide_index && g.size < (int64_t(1) << 31);
  if (P.small) P.div_cols.init(static_cast<uint32_t>(g.cols));
  P.part = static_cast<float*>(workspace);
  switch (a.dtype) {
    case DType::kFloat32: return launch_vec<DType::kFloat32>(P, plan.vec, groups, stream);
    case DType::kFloat16: return launch_vec<DType::kFloat16>(P, plan.vec, groups, stream);
    case DType::kBFloat16: return launch_vec<DType::kBFloat16>(P, plan.vec, groups, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace group_norm_silu
}  // namespace fastdiff
