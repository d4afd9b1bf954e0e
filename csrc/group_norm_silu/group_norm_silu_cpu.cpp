// fastdiff::group_norm_silu -- CPU kernel. Torch-free: raw pointers and sizes only (contract in
// group_norm_silu.h).
//
// Work items are (group, chunk) pairs, spread over OpenMP threads. A chunk is a range of the
// group's flattened [R, K] matrix, walked as row segments (contiguous in memory).
//
//   statistics  the segments' d = (x - x0) + (temb[c] - temb0) are gathered into a small fp32
//               block (kBlock elements, L1-resident); each full block gets an exact two-pass
//               mean/M2 (omp simd reductions) and is merged into the running (n, mean, M2)
//               with Chan's formula.
//   normalise   one branch-free `omp simd` loop per segment: (x - x0) * scale[c] + shift[c],
//               SiLU (a vectorisable exp), + residual, rounded to the storage dtype.
//
// One chunk per group (the default when there are at least as many groups as threads): both
// passes in one work item, the second one reading the group again from cache. Split groups:
// a parallel loop writes each chunk's (n, mean, M2, x0), a second one merges a group's partials
// and normalises the chunk (x0 comes from the partials, so out == x is safe).
//
// The kernel body (group_norm_silu_cpu_kernel.inc) is compiled three times on x86-64 with GCC
// -- baseline (SSE2), AVX2+FMA and AVX-512 -- and the widest one the CPU supports is picked
// at run time: the SiLU's exp is arithmetic-bound (~40 operations per 4 floats with SSE2), and
// eager PyTorch runs its own SiLU with AVX-512. The build flags stay the project's baseline.
#include "group_norm_silu.h"

#include "../common/cpu_isa.h"
#include "../common/half_convert.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {
namespace group_norm_silu {
namespace {

// Elements per exact two-pass statistics block.
constexpr int64_t kBlock = 512;
// Below this many elements in all, one thread does everything.
constexpr int64_t kParallelMin = int64_t(1) << 15;
// Automatic splitting never makes chunks smaller than this.
constexpr int64_t kMinChunk = 16384;

template <DType T>
struct Storage;
template <>
struct Storage<DType::kFloat32> {
  using type = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
};
template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

// One element of a per-channel parameter of any supported dtype (not in hot loops).
inline float load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// ---------------------------------------------------------------------------------- variants

// The SiLU must inline into the `omp simd` loops (a call there stops vectorisation).
#if defined(__GNUC__) || defined(__clang__)
#define GN_INLINE inline __attribute__((always_inline))
#else
#define GN_INLINE inline
#endif

#define GN_ISA isa_baseline
#define GN_MADD(a, b, c) ((a) * (b) + (c))
#include "group_norm_silu_cpu_kernel.inc"
#undef GN_MADD
#undef GN_ISA

#ifdef FASTDIFF_CPU_MULTIVERSION
#define GN_MADD(a, b, c) __builtin_fmaf((a), (b), (c))

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GN_ISA isa_avx2
#include "group_norm_silu_cpu_kernel.inc"
#undef GN_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,prefer-vector-width=512")
#define GN_ISA isa_avx512
#include "group_norm_silu_cpu_kernel.inc"
#undef GN_ISA
#pragma GCC pop_options

#undef GN_MADD
#endif

using RunFn = void (*)(const Args&, int);

RunFn pick_run(CpuIsa isa) {
#ifdef FASTDIFF_CPU_MULTIVERSION
  if (isa == CpuIsa::kAvx512) return &isa_avx512::run;
  if (isa == CpuIsa::kAvx2) return &isa_avx2::run;
#else
  (void)isa;
#endif
  return &isa_baseline::run;
}

}  // namespace

int64_t group_norm_silu_cpu_splits(const Args& a, int num_threads) {
  const Geometry g = geometry(a);
  const int64_t groups = a.N * a.groups;
  if (g.size <= 1) return 1;
  int64_t splits;
  if (a.num_splits > 0) {
    splits = a.num_splits;
  } else {
#ifdef _OPENMP
    const int64_t nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
    (void)num_threads;
    const int64_t nt = 1;
#endif
    splits = groups >= nt ? 1 : std::min((nt + groups - 1) / std::max<int64_t>(groups, 1), g.size / kMinChunk);
  }
  splits = std::max<int64_t>(1, std::min(splits, g.size));
  const int64_t chunk = (g.size + splits - 1) / splits;
  return (g.size + chunk - 1) / chunk;  // no empty chunk
}

void group_norm_silu_cpu(const Args& a, int num_threads) {
  if (numel(a) == 0) return;
  pick_run(cpu_isa())(a, num_threads);
}

const char* group_norm_silu_cpu_isa() { return cpu_isa_name(cpu_isa()); }

}  // namespace group_norm_silu
}  // namespace fastdiff
