// fastdiff::solver_step -- CPU kernel. Torch-free: raw pointers and sizes only (contract in
// solver_step.h). OpenMP splits the flat range into chunks; inside a chunk every pass is a
// plain, branch-free loop over fp32 scratch arrays that the compiler vectorises (the dtype
// conversions below are written with selects, not branches, for that reason).
#include "solver_step.h"

#include <algorithm>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {
namespace solver_step {
namespace {

// Elements per chunk: three fp32 scratch arrays of this size stay in L1.
constexpr int kChunk = 1024;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 16;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, exact for every input (subnormals, inf, NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Finite values: put exponent and mantissa where a float has them and rescale by
  // 2^(127-15) = 2^112; exact, also for half subnormals (which become float subnormals
  // before the multiply).
  const uint32_t finite = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
  const uint32_t inf_nan = 0x7f800000u | ((em & 0x3ffu) << 13);
  return bits_to_float(sign | (em >= 0x7c00u ? inf_nan : finite));
}

// float -> IEEE half, round to nearest even; overflow -> inf, NaN -> quiet NaN (0x7e00).
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // Normal half results: rebias the exponent (-112 << 23) and round the 13 dropped bits
  // to nearest even; a carry rolls into the exponent (65520 -> inf) as it should.
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  // Subnormal half results (|f| < 2^-14): adding 0.5f lines the half-subnormal ulp (2^-24)
  // up with the float ulp of 0.5, so the FPU's round-to-nearest-even does the rounding.
  const uint32_t subnormal = float_to_bits(bits_to_float(u) + 0.5f) - 0x3f000000u;
  uint32_t o = u < 0x38800000u ? subnormal : normal;
  o = u >= 0x47800000u ? 0x7c00u : o;  // >= 65536 (and inf): inf
  o = u > 0x7f800000u ? 0x7e00u : o;   // NaN
  return uint16_t(o | sign);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// float -> bfloat16, round to nearest even; NaN -> quiet NaN (0x7fc0), as torch does.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

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

template <DType TM, DType TS>
void run(const Args& a, int num_threads) {
  using M = Storage<TM>;
  using S = Storage<TS>;
  using MT = typename M::type;
  using ST = typename S::type;

  const int64_t numel = a.numel;
  const MT* model = static_cast<const MT*>(a.model);
  const MT* uncond = static_cast<const MT*>(a.uncond);
  const ST* x = static_cast<const ST*>(a.x);
  const ST* hist[3] = {static_cast<const ST*>(a.hist_read[0]), static_cast<const ST*>(a.hist_read[1]),
                       static_cast<const ST*>(a.hist_read[2])};
  const ST* noise = static_cast<const ST*>(a.noise);
  ST* out = static_cast<ST*>(a.out);
  ST* hist_write = static_cast<ST*>(a.hist_write);

  const float p = a.coef[kP], q = a.coef[kQ], ca = a.coef[kA], b0 = a.coef[kB0], c = a.coef[kC];
  const float bh[3] = {a.coef[kB1], a.coef[kB2], a.coef[kB3]};
  const float w = a.guidance;
  const float r = a.clamp;
  const bool do_clamp = r > 0.0f;

  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  const bool parallel = numel >= kParallelMin && nchunks > 1;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif

#pragma omp parallel for schedule(static) if (parallel) num_threads(nt)
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t begin = ci * kChunk;
    const int n = int(std::min<int64_t>(kChunk, numel - begin));
    alignas(64) float m[kChunk];
    alignas(64) float d[kChunk];
    alignas(64) float acc[kChunk];

    // Every input of this chunk is read (into m/d/acc) before anything is stored, which
    // is what makes out == x and hist_write == hist_read[k] safe.
    const MT* mc = model + begin;
    for (int j = 0; j < n; ++j) m[j] = M::load(mc[j]);
    if (uncond != nullptr) {
      const MT* uc = uncond + begin;
      for (int j = 0; j < n; ++j) {
        const float u = M::load(uc[j]);
        m[j] = u + w * (m[j] - u);
      }
    }
    const ST* xc = x + begin;
    for (int j = 0; j < n; ++j) d[j] = p * S::load(xc[j]) + q * m[j];
    if (do_clamp) {
      // Comparisons (not fminf/fmaxf) so that NaN propagates like torch.clamp.
      for (int j = 0; j < n; ++j) d[j] = d[j] < -r ? -r : (d[j] > r ? r : d[j]);
    }
    for (int j = 0; j < n; ++j) acc[j] = ca * S::load(xc[j]) + b0 * d[j];
    for (int k = 0; k < 3; ++k) {
      if (hist[k] == nullptr) continue;
      const ST* hc = hist[k] + begin;
      const float b = bh[k];
      for (int j = 0; j < n; ++j) acc[j] += b * S::load(hc[j]);
    }
    if (noise != nullptr) {
      const ST* zc = noise + begin;
      for (int j = 0; j < n; ++j) acc[j] += c * S::load(zc[j]);
    }
    ST* oc = out + begin;
    for (int j = 0; j < n; ++j) oc[j] = S::store(acc[j]);
    if (hist_write != nullptr) {
      ST* wc = hist_write + begin;
      for (int j = 0; j < n; ++j) wc[j] = S::store(d[j]);
    }
  }
}

}  // namespace

void solver_step_cpu(const Args& a, int num_threads) {
  if (a.numel == 0) return;
  const bool fp32_state = a.state_dtype == DType::kFloat32;
  switch (a.model_dtype) {
    case DType::kFloat32:
      run<DType::kFloat32, DType::kFloat32>(a, num_threads);
      break;
    case DType::kFloat16:
      if (fp32_state)
        run<DType::kFloat16, DType::kFloat32>(a, num_threads);
      else
        run<DType::kFloat16, DType::kFloat16>(a, num_threads);
      break;
    case DType::kBFloat16:
      if (fp32_state)
        run<DType::kBFloat16, DType::kFloat32>(a, num_threads);
      else
        run<DType::kBFloat16, DType::kBFloat16>(a, num_threads);
      break;
  }
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
