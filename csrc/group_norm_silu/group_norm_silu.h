// fastdiff::group_norm_silu -- the torch-free, CUDA-free contract shared by the CPU kernel
// (group_norm_silu_cpu.cpp), the CUDA kernels (group_norm_silu.cu, launcher in
// group_norm_silu.cuh) and the torch binding (group_norm_silu_binding.cpp).
//
// x is (N, C, S) -- S the product of the spatial sizes -- stored contiguous (kNCS: x[n][c][s])
// or channels-last (kNSC: x[n][s][c]); residual and out have the same layout. Per sample n and
// group g of C/G channels:
//
//   h   = x + temb[n][c]                        (temb == nullptr: h = x)
//   hn  = (h - mean) / sqrt(var + eps)          mean/var over the group's C/G * S values (biased)
//   y   = hn * weight[c] + bias[c]              (absent parts skipped)
//   y   = y * sigmoid(y)                        (silu)
//   out = y + residual                          (residual == nullptr: skipped)
//
// Numerics (both kernels): statistics of d = (x - x0) + (temb[c] - temb0), x0 the group's first
// element and temb0 its first time-embedding entry (GroupNorm is shift-invariant; the shift keeps
// fp32 exact for groups far from zero); exact two-pass mean/M2 over small blocks merged with
// Chan's formula; out = (x - x0) * scale[c] + shift[c]. fp32 arithmetic for every storage dtype.
//
// Work split: each group is the row-major matrix [R, K] (kNCS: R = C/G channels, K = S; kNSC:
// R = S, K = C/G), flattened to L = R * K elements and cut into `splits` chunks. One chunk per
// group: one pass (one kernel). More: partial statistics per chunk into a workspace, then a
// normalise pass over each chunk (x read twice).
//
// out may alias x or residual exactly (every element is read before it is written, by the same
// thread, and a split group's x0 is carried in the workspace); no other overlap is allowed.
#pragma once

#include <cstdint>

namespace fastdiff {
namespace group_norm_silu {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Layout : int32_t { kNCS = 0, kNSC = 1 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct Args {
  int64_t N = 0, C = 0, S = 0;  // x is (N, C, S) in `layout`
  int64_t groups = 1;
  Layout layout = Layout::kNCS;
  DType dtype = DType::kFloat32;  // x, residual, out
  const void* x = nullptr;
  const void* residual = nullptr;  // nullptr: no residual
  void* out = nullptr;
  const void* weight = nullptr;  // (C,) strided; nullptr: 1
  DType weight_dtype = DType::kFloat32;
  int64_t weight_stride = 1;
  const void* bias = nullptr;  // (C,) strided; nullptr: 0
  DType bias_dtype = DType::kFloat32;
  int64_t bias_stride = 1;
  const void* temb = nullptr;  // (N, C) strided; nullptr: no add
  DType temb_dtype = DType::kFloat32;
  int64_t temb_stride_n = 0, temb_stride_c = 1;
  float eps = 1e-5f;
  bool silu = true;
  int num_splits = 0;  // 0: automatic; 1: one chunk per group; k > 1: at most k chunks per group
  // true: index with 64-bit division at any size, the path groups of >= 2^31 elements take
  // (lets the tests run that path on small tensors)
  bool wide_index = false;
};

// Geometry of one group's matrix (see above).
struct Geometry {
  int64_t cpg;           // channels per group
  int64_t rows, cols;    // R, K
  int64_t row_stride;    // elements between rows
  int64_t sample_stride; // elements between samples
  int64_t group_stride;  // elements between the first elements of consecutive groups of a sample
  int64_t size;          // L = R * K
};

inline Geometry geometry(const Args& a) {
  Geometry g;
  g.cpg = a.groups > 0 ? a.C / a.groups : 0;
  if (a.layout == Layout::kNCS) {
    g.rows = g.cpg;
    g.cols = a.S;
    g.row_stride = a.S;
    g.group_stride = g.cpg * a.S;
  } else {
    g.rows = a.S;
    g.cols = g.cpg;
    g.row_stride = a.C;
    g.group_stride = g.cpg;
  }
  g.sample_stride = a.C * a.S;
  g.size = g.rows * g.cols;
  return g;
}

inline int64_t numel(const Args& a) { return a.N * a.C * a.S; }

// nullptr when `a` is a valid combination, else a static message (no torch here).
inline const char* check_args(const Args& a) {
  if (a.N < 0 || a.C < 0 || a.S < 0) return "sizes must be >= 0";
  if (a.groups < 1) return "num_groups must be >= 1";
  if (a.C % a.groups != 0) return "num_groups must divide the channel count C";
  if (!(a.eps > 0.0f && a.eps <= 3.4028234e38f)) return "eps must be a finite number > 0";  // NaN fails too
  if (a.num_splits < 0) return "num_splits must be >= 0";
  if (numel(a) > 0 && (a.x == nullptr || a.out == nullptr)) return "x and out must not be null";
  return nullptr;
}

// CPU kernel (group_norm_silu_cpu.cpp): OpenMP over (group, chunk) work items; `num_threads`
// <= 0 means the OpenMP default. Automatic splitting only when there are fewer groups than
// threads. Precondition: check_args(a) == nullptr.
void group_norm_silu_cpu(const Args& a, int num_threads);

// Number of chunks per group the CPU kernel uses for `a` with `num_threads` threads.
int64_t group_norm_silu_cpu_splits(const Args& a, int num_threads);

// The instruction set of the CPU kernel variant this machine runs: "avx512", "avx2" or
// "baseline" (the kernel is compiled for all three on x86-64 with GCC and picked at run time;
// the environment variable FASTDIFF_CPU_ISA=baseline|avx2 caps it).
const char* group_norm_silu_cpu_isa();

}  // namespace group_norm_silu
}  // namespace fastdiff
