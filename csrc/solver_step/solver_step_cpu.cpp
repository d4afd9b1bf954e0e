// fastdiff::solver_step -- CPU kernel. Torch-free: raw pointers and sizes only (contract in
// solver_step.h). OpenMP splits the flat range into blocks; each block is one branch-free
// loop that the compiler vectorises (the dtype conversions below are written with selects,
// not branches, for that reason; -fno-trapping-math lets gcc if-convert them).
#include "solver_step.h"

#include "../common/half_convert.h"

#include <algorithm>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {
namespace solver_step {
namespace {

// Elements per OpenMP work item.
constexpr int64_t kBlock = 16384;
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

// One pass over the flat range; every element is read before it is written (so out == x and
// hist_write == a history read slot are safe). `#pragma omp simd` tells the compiler what it
// cannot prove: iterations are independent even though the pointers may alias exactly (it
// would otherwise version the loop on an overlap check and run the aliased ring-buffer case,
// the common one, scalar). The optional terms are template parameters so that the loop body
// has no branches: HAS_U (CFG), NT extra terms (history reads, then the noise -- the
// reference's summation order), HAS_HW (store D). Clamp is always applied, with r = +inf when
// off: clamp(d, -inf, inf) == d for every d, NaN included.
template <DType TM, DType TS, bool HAS_U, int NT, bool HAS_HW>
void run(const Args& a, const void* const* terms, const float* tcoef, float r, int num_threads) {
  using M = Storage<TM>;
  using S = Storage<TS>;
  using MT = typename M::type;
  using ST = typename S::type;

  const int64_t numel = a.numel;
  const MT* model = static_cast<const MT*>(a.model);
  const MT* uncond = static_cast<const MT*>(a.uncond);
  const ST* x = static_cast<const ST*>(a.x);
  const ST* t0 = static_cast<const ST*>(terms[0]);
  const ST* t1 = static_cast<const ST*>(terms[1]);
  const ST* t2 = static_cast<const ST*>(terms[2]);
  const ST* t3 = static_cast<const ST*>(terms[3]);
  ST* out = static_cast<ST*>(a.out);
  ST* hist_write = static_cast<ST*>(a.hist_write);

  const float p = a.coef[kP], q = a.coef[kQ], ca = a.coef[kA], b0 = a.coef[kB0];
  const float c0 = tcoef[0], c1 = tcoef[1], c2 = tcoef[2], c3 = tcoef[3];
  const float w = a.guidance_ptr != nullptr ? *a.guidance_ptr : a.guidance;

  const int64_t nblocks = (numel + kBlock - 1) / kBlock;
  const bool parallel = numel >= kParallelMin && nblocks > 1;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif

#pragma omp parallel for schedule(static) if (parallel) num_threads(nt)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t begin = blk * kBlock;
    const int64_t end = std::min(numel, begin + kBlock);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float m = M::load(model[i]);
      if constexpr (HAS_U) {
        const float u = M::load(uncond[i]);
        m = u + w * (m - u);
      }
      const float xv = S::load(x[i]);
      float d = p * xv + q * m;
      d = d < -r ? -r : (d > r ? r : d);  // comparisons, not fminf/fmaxf: NaN propagates
      float acc = ca * xv + b0 * d;
      if constexpr (NT > 0) acc += c0 * S::load(t0[i]);
      if constexpr (NT > 1) acc += c1 * S::load(t1[i]);
      if constexpr (NT > 2) acc += c2 * S::load(t2[i]);
      if constexpr (NT > 3) acc += c3 * S::load(t3[i]);
      out[i] = S::store(acc);
      if constexpr (HAS_HW) hist_write[i] = S::store(d);
    }
  }
}

using RunFn = void (*)(const Args&, const void* const*, const float*, float, int);

template <DType TM, DType TS, bool HAS_U, bool HAS_HW>
RunFn pick_nt(int nt) {
  switch (nt) {
    case 0: return &run<TM, TS, HAS_U, 0, HAS_HW>;
    case 1: return &run<TM, TS, HAS_U, 1, HAS_HW>;
    case 2: return &run<TM, TS, HAS_U, 2, HAS_HW>;
    case 3: return &run<TM, TS, HAS_U, 3, HAS_HW>;
    default: return &run<TM, TS, HAS_U, 4, HAS_HW>;
  }
}

template <DType TM, DType TS>
RunFn pick(bool has_u, int nt, bool has_hw) {
  if (has_u) return has_hw ? pick_nt<TM, TS, true, true>(nt) : pick_nt<TM, TS, true, false>(nt);
  return has_hw ? pick_nt<TM, TS, false, true>(nt) : pick_nt<TM, TS, false, false>(nt);
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
  const float r = a.clamp > 0.0f ? a.clamp : std::numeric_limits<float>::infinity();
  const bool has_u = a.uncond != nullptr;
  const bool has_hw = a.hist_write != nullptr;
  const bool fp32_state = a.state_dtype == DType::kFloat32;
  RunFn fn = nullptr;
  switch (a.model_dtype) {
    case DType::kFloat32:
      fn = pick<DType::kFloat32, DType::kFloat32>(has_u, nt, has_hw);
      break;
    case DType::kFloat16:
      fn = fp32_state ? pick<DType::kFloat16, DType::kFloat32>(has_u, nt, has_hw)
                      : pick<DType::kFloat16, DType::kFloat16>(has_u, nt, has_hw);
      break;
    case DType::kBFloat16:
      fn = fp32_state ? pick<DType::kBFloat16, DType::kFloat32>(has_u, nt, has_hw)
                      : pick<DType::kBFloat16, DType::kBFloat16>(has_u, nt, has_hw);
      break;
  }
  fn(a, terms, tcoef, r, num_threads);
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
