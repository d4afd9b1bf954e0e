// fastdiff::solver_step -- the torch-free, CUDA-free contract shared by the CPU kernel
// (solver_step_cpu.cpp), the CUDA kernel (solver_step.cu, launcher in solver_step.cuh) and
// the torch binding (solver_step_binding.cpp).
//
// Elementwise over `numel` elements laid out identically in every buffer (the common dense
// storage order of the tensors: contiguous or channels_last, treated as flat):
//
//   m   = model                                  (uncond == nullptr)
//   m   = u + guidance * (model - u)             (CFG; u = uncond; guidance or *guidance_ptr)
//   D   = p * x + q * m
//   Dc  = clamp(D, -clamp, clamp)                (only when clamp > 0, else Dc = D; NaN propagates)
//   out = a * x + r * D + b0 * Dc + b1 * H1 + b2 * H2 + b3 * H3 + c * z   (absent terms skipped)
//   HW  = Dc                                     (only when hist_write != nullptr)
//
// Arithmetic is fp32 whatever the storage dtype. `model`/`uncond` are stored in
// `model_dtype`; `x`, `out`, the history buffers and the noise in `state_dtype`, which is
// float32 or equal to `model_dtype`. Every element is read before it is written, by the same
// thread, so `out` may alias `x` and `hist_write` may alias one of `hist_read` (a ring buffer
// reading D_{i-1} from the slot it overwrites); other overlaps are not allowed.
#pragma once

#include <cstdint>

namespace fastdiff {
namespace solver_step {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

enum Coef : int { kP = 0, kQ, kA, kB0, kB1, kB2, kB3, kC, kR, kNumCoefs };

struct Args {
  int64_t numel = 0;
  DType model_dtype = DType::kFloat32;  // model, uncond
  DType state_dtype = DType::kFloat32;  // x, hist_read, noise, out, hist_write
  const void* x = nullptr;
  const void* model = nullptr;          // conditional (or only) model output
  const void* uncond = nullptr;         // nullptr: no CFG
  const void* hist_read[3] = {nullptr, nullptr, nullptr};  // D_{i-1..i-3}; nullptr: term skipped
  const void* noise = nullptr;          // nullptr: no noise term
  void* out = nullptr;
  void* hist_write = nullptr;           // nullptr: D_i not stored
  float coef[kNumCoefs] = {0, 0, 0, 0, 0, 0, 0, 0, 0};  // p, q, a, b0, b1, b2, b3, c, r
  float guidance = 1.0f;
  // When set, the guidance scale is read from this fp32 scalar (device memory for the CUDA
  // kernel, host memory for the CPU kernel) at run time instead of `guidance`: a CUDA graph
  // then replays with whatever scale was written there last.
  const float* guidance_ptr = nullptr;
  float clamp = 0.0f;                   // <= 0: no clamp
};

// nullptr when `args` is a valid combination, else a static message (no torch here).
inline const char* check_args(const Args& a) {
  if (a.numel < 0) return "numel must be >= 0";
  if (a.state_dtype != DType::kFloat32 && a.state_dtype != a.model_dtype)
    return "state dtype must be float32 or the model dtype";
  if (a.numel > 0 && (a.x == nullptr || a.model == nullptr || a.out == nullptr))
    return "x, model and out must not be null";
  return nullptr;
}

// CPU kernel (solver_step_cpu.cpp): OpenMP over chunks when numel is large enough,
// `num_threads` <= 0 means the OpenMP default. Precondition: check_args(a) == nullptr.
void solver_step_cpu(const Args& a, int num_threads);

// 1 if solver_step_cpu was compiled with OpenMP.
int solver_step_cpu_has_openmp();

}  // namespace solver_step
}  // namespace fastdiff
