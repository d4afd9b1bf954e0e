// fastdiff::group_norm_silu -- torch binding: adapts tensors to the torch-free kernels, checks
// the inputs and registers the private op `fastdiff_C::group_norm_silu` (CPU kernel; CUDA
// kernels when built with CUDA). The public op `fastdiff::group_norm_silu`
// (fastdiff/ops/group_norm_silu.py) validates everything with friendlier messages first and
// dispatches here for the "cpu" and "cuda" backends; these checks are the last line for direct
// callers.
//
// Layout: x contiguous (N, C, *spatial) or channels-last (C innermost); residual and out with
// x's strides. weight/bias (C,) and temb (N, C) with any strides.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/known_calls.h"
#include "../common/python_functions.h"
#include "../common/torch_dtype.h"
#include "group_norm_silu.h"

#ifdef FASTDIFF_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "group_norm_silu.cuh"
#endif

namespace fastdiff {
namespace group_norm_silu {
namespace {

constexpr const char* kOp = "fastdiff_C::group_norm_silu: ";

DType to_dtype(at::ScalarType t, const char* name) { return scalar_type_to<DType>(t, kOp, name); }

// Strides wherever a dimension has more than one element (size-1 strides never address memory).
bool strides_match(at::IntArrayRef sizes, at::IntArrayRef strides, const std::vector<int64_t>& expected) {
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && strides[d] != expected[d]) return false;
  }
  return true;
}

std::vector<int64_t> channels_last_strides(at::IntArrayRef sizes) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> st(sizes.size());
  int64_t acc = 1;
  st[1] = acc;
  acc *= sizes[1];
  for (int64_t d = nd - 1; d >= 2; --d) {
    st[d] = acc;
    acc *= sizes[d];
  }
  st[0] = acc;
  return st;
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kOp, name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), kOp, name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(strides_match(x.sizes(), t.strides(), x.strides().vec()), kOp, name,
              " must have the same memory layout as x (all contiguous or all channels_last): strides ",
              t.strides(), " vs x ", x.strides());
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t c) {
  TORCH_CHECK(t.device() == x.device(), kOp, name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, kOp, name, " must have shape (C,) = (", c, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), kOp, name,
              " must be float32 or x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
}

Args make_args(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& bias, double eps, bool silu, const std::optional<at::Tensor>& temb,
               const std::optional<at::Tensor>& residual, int64_t num_splits, const at::Tensor& out,
               c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, kOp, "x must be a ", device_type, " tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, kOp, "x must have shape (N, C, *spatial), got ", x.sizes());
  Args a;
  a.dtype = to_dtype(x.scalar_type(), "x");
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) a.S *= x.size(d);
  if (x.is_contiguous()) {
    a.layout = Layout::kNCS;
  } else {
    TORCH_CHECK(strides_match(x.sizes(), x.strides(), channels_last_strides(x.sizes())), kOp,
                "x must be contiguous or channels_last, got strides ", x.strides());
    a.layout = Layout::kNSC;
  }
  TORCH_CHECK(num_groups >= 1 && a.C % num_groups == 0, kOp, "num_groups must be a positive divisor of C = ", a.C,
              ", got ", num_groups);
  a.groups = num_groups;
  check_like_x(out, "out", x);
  if (residual.has_value()) check_like_x(*residual, "residual", x);
  if (weight.has_value()) check_param(*weight, "weight", x, a.C);
  if (bias.has_value()) check_param(*bias, "bias", x, a.C);
  if (temb.has_value()) {
    const at::Tensor& t = *temb;
    TORCH_CHECK(t.device() == x.device(), kOp, "temb must be on ", x.device(), " like x, got ", t.device());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == a.N && t.size(1) == a.C, kOp, "temb must have shape (N, C) = (", a.N,
                ", ", a.C, "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), kOp,
                "temb must be float32 or x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  }
  TORCH_CHECK(num_splits >= 0 && num_splits <= (int64_t(1) << 30), kOp, "num_splits must be >= 0, got ", num_splits);

  a.x = x.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  if (weight.has_value()) {
    a.weight = weight->const_data_ptr();
    a.weight_dtype = to_dtype(weight->scalar_type(), "weight");
    a.weight_stride = weight->stride(0);
  }
  if (bias.has_value()) {
    a.bias = bias->const_data_ptr();
    a.bias_dtype = to_dtype(bias->scalar_type(), "bias");
    a.bias_stride = bias->stride(0);
  }
  if (temb.has_value()) {
    a.temb = temb->const_data_ptr();
    a.temb_dtype = to_dtype(temb->scalar_type(), "temb");
    a.temb_stride_n = temb->stride(0);
    a.temb_stride_c = temb->stride(1);
  }
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  a.num_splits = static_cast<int>(num_splits);
  const char* err = check_args(a);
  TORCH_CHECK(err == nullptr, kOp, err);
  return a;
}

void group_norm_silu_cpu_impl(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps, bool silu,
                              const std::optional<at::Tensor>& temb, const std::optional<at::Tensor>& residual,
                              int64_t num_splits, const at::Tensor& out) {
  const Args a = make_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, c10::kCPU);
  group_norm_silu_cpu(a, at::get_num_threads());
}

#ifdef FASTDIFF_WITH_CUDA
void group_norm_silu_cuda_impl(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu,
                               const std::optional<at::Tensor>& temb, const std::optional<at::Tensor>& residual,
                               int64_t num_splits, const at::Tensor& out) {
  const Args a = make_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, c10::kCUDA);
  const char* err = check_cuda_args(a);
  TORCH_CHECK(err == nullptr, kOp, err);
  const c10::cuda::CUDAGuard guard(x.device());
  // the split path's partial statistics: from the caching allocator (graph-capture safe)
  const size_t ws_bytes = group_norm_silu_cuda_workspace_bytes(a);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(group_norm_silu_cuda(a, ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, ws_bytes,
                                      c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
}
#endif

// --- fastdiff.group_norm_silu()'s fast path (common/known_calls.h) -----------------------------

namespace py = pybind11;

struct KnownNorm {
  // fastdiff.group_norm_silu(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits,
  // out, backend) as its wrapper received it (out may be None)
  struct Call {
    const at::Tensor* x;
    int64_t num_groups;
    const at::Tensor* weight;
    const at::Tensor* bias;
    double eps;
    bool silu;
    const at::Tensor* temb;
    const at::Tensor* residual;
    int64_t num_splits;
    const at::Tensor* out;
    known_calls::Backend backend;
  };
  static constexpr size_t kOut = 9;

  // A new output overlaps nothing, so its key leaves every pointer out: a U-Net's activations
  // sit at new addresses at every call.
  static bool read(const py::args& a, Call& c, known_calls::Key& key) {
    using namespace known_calls;
    if (a.size() != 11 || !read_tensor(a[0].ptr(), c.x, false) || !read_int(a[1].ptr(), c.num_groups) ||
        !read_tensor(a[2].ptr(), c.weight, true) || !read_tensor(a[3].ptr(), c.bias, true) ||
        !read_double(a[4].ptr(), c.eps) || !read_bool(a[5].ptr(), c.silu) || !read_tensor(a[6].ptr(), c.temb, true) ||
        !read_tensor(a[7].ptr(), c.residual, true) || !read_int(a[8].ptr(), c.num_splits) ||
        !read_tensor(a[kOut].ptr(), c.out, true) || !read_backend(a[10].ptr(), c.backend)) {
      return false;
    }
    const bool pointers = c.out != nullptr;
    for (const at::Tensor* t : {c.x, c.weight, c.bias, c.temb, c.residual, c.out}) key.tensor(t, pointers);
    key.word(c.num_groups);
    key.number(c.eps);
    key.word(c.silu);
    key.word(c.num_splits);
    key.backend_choice(c.backend);
    return true;
  }

  static at::Tensor run(const Call& c) {
    using known_calls::optional;
    at::Tensor out = c.out != nullptr ? *c.out : at::empty_like(*c.x);
#ifdef FASTDIFF_WITH_CUDA
    if (c.x->is_cuda()) {
      group_norm_silu_cuda_impl(*c.x, c.num_groups, optional(c.weight), optional(c.bias), c.eps, c.silu,
                                optional(c.temb), optional(c.residual), c.num_splits, out);
      return out;
    }
#endif
    group_norm_silu_cpu_impl(*c.x, c.num_groups, optional(c.weight), optional(c.bias), c.eps, c.silu,
                             optional(c.temb), optional(c.residual), c.num_splits, out);
    return out;
  }
};

[[maybe_unused]] const bool added =
    add_python_functions([](py::module_& m) { known_calls::define<KnownNorm>(m, "group_norm_silu"); });

}  // namespace
}  // namespace group_norm_silu
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_C, m) {
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
      "Tensor? temb, Tensor? residual, int num_splits, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu::group_norm_silu_cpu_impl);
}

#ifdef FASTDIFF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdiff_C, CUDA, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu::group_norm_silu_cuda_impl);
}
#endif
