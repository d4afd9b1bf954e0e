// fastdiff::solver_step -- CPU kernel. Torch-free: raw pointers and sizes only (contract in
// solver_step.h). OpenMP splits the flat range into blocks; each block is one branch-free
// loop that the compiler vectorises (the dtype conversions below are written with selects,
// not branches, for that reason; -fno-trapping-math lets gcc if-convert them).
//
// The loop (solver_step_cpu_kernel.inc) is compiled three times on x86-64 with GCC -- baseline
// (SSE2), AVX2+FMA+F16C and AVX-512 -- and the widest one the CPU supports runs (common/cpu_isa.h):
// with SSE2 the 16-bit conversions and the 4-wide loop keep it well below copy bandwidth even
// in cache; the F16C variants convert fp16 model reads in hardware (benchmarks/NOTES.md,
// solver_step CPU kernel).
#include "solver_step.h"

#include "../common/cpu_isa.h"
#include "../common/half_convert.h"

#include <algorithm>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef FASTDIFF_CPU_MULTIVERSION
#include <immintrin.h>
#endif

namespace fastdiff {
namespace solver_step {
namespace {

// Elements per OpenMP work item.
constexpr int64_t kBlock = 16384;
// Elements per sub-block whose fp16 model reads are converted to fp32 first (F16C variants).
constexpr int64_t kCvt = 1024;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 16;

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

using RunFn = void (*)(const Args&, const void* const*, const float*, float, int);

#define SS_ISA isa_baseline
#include "solver_step_cpu_kernel.inc"
#undef SS_ISA

#ifdef FASTDIFF_CPU_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SS_F16C 1
#define SS_ISA isa_avx2
#include "solver_step_cpu_kernel.inc"
#undef SS_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,prefer-vector-width=512")
#define SS_ISA isa_avx512
#include "solver_step_cpu_kernel.inc"
#undef SS_ISA
#undef SS_F16C
#pragma GCC pop_options
#endif

RunFn select(CpuIsa isa, const Args& a, bool has_u, int nt, bool has_hw) {
#ifdef FASTDIFF_CPU_MULTIVERSION
  if (isa == CpuIsa::kAvx512) return isa_avx512::select(a, has_u, nt, has_hw);
  if (isa == CpuIsa::kAvx2) return isa_avx2::select(a, has_u, nt, has_hw);
#else
  (void)isa;
#endif
  return isa_baseline::select(a, has_u, nt, has_hw);
}

}  // namespace

void solver_step_cpu(const Args& a, int num_threads) {
  if (a.numel == 0) return;
  // Pack the extra terms: history reads D_{i-1..i-3} that are present, then the noise.
  const void* terms[4] = {nullptr, nullptr, nullptr, nullptr};
  float tcoef[4] = {0, 0, 0, 0};
  int nt = 0;
  for (int k = 0; k < 3; ++k) {
    if (a.hist_read[k] != nullptr) {
      terms[nt] = a.hist_read[k];
      tcoef[nt++] = a.coef[kB1 + k];
    }
  }
  if (a.noise != nullptr) {
    terms[nt] = a.noise;
    tcoef[nt++] = a.coef[kC];
  }
  const float bound = a.clamp > 0.0f ? a.clamp : std::numeric_limits<float>::infinity();
  const bool has_u = a.uncond != nullptr;
  const bool has_hw = a.hist_write != nullptr;
  select(cpu_isa(), a, has_u, nt, has_hw)(a, terms, tcoef, bound, num_threads);
}

int solver_step_cpu_has_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

}  // namespace solver_step
}  // namespace fastdiff
