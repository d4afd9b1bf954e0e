// fastdiff -- scalar fp16/bf16 <-> fp32 conversions shared by the CPU kernels. Torch-free.
// Written with selects, not branches, so that the loops calling them vectorise (with
// -fno-trapping-math gcc if-converts them).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastdiff {

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

// float -> bfloat16, round to nearest even; NaN -> the canonical quiet NaN 0x7fc0, as torch's
// own conversion does (so the kernels match the reference bit for bit).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

}  // namespace fastdiff
