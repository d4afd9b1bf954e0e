// Run-time choice among the x86-64 variants of a CPU kernel. A kernel body compiled several
// times under `#pragma GCC target` (baseline SSE2, AVX2+FMA+F16C, AVX-512) runs with the widest
// variant this CPU supports; the build flags stay the project's baseline, so one binary runs
// everywhere. GCC only (function-level target pragmas): other compilers get the baseline.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_CPU_MULTIVERSION 1
#endif

namespace fastdiff {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The widest variant this CPU runs (what the target pragmas of the variants require).
inline CpuIsa detect_cpu_isa() {
#ifdef FASTDIFF_CPU_MULTIVERSION
  __builtin_cpu_init();
  // every AVX2 CPU has F16C, but a hypervisor may hide it; the variants use it
  if (!__builtin_cpu_supports("f16c")) return CpuIsa::kBaseline;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// The variant to run: the detected one, capped by FASTDIFF_CPU_ISA=baseline|avx2 (the tests run
// every variant on one machine). The environment is read at every call; the detection is cached.
inline CpuIsa cpu_isa() {
  static const CpuIsa best = detect_cpu_isa();
  const char* cap = std::getenv("FASTDIFF_CPU_ISA");
  CpuIsa limit = CpuIsa::kAvx512;
  if (cap != nullptr && std::strcmp(cap, "baseline") == 0) limit = CpuIsa::kBaseline;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) limit = CpuIsa::kAvx2;
  return static_cast<int>(best) < static_cast<int>(limit) ? best : limit;
}

}  // namespace fastdiff
