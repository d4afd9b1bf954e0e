// fastdiff::solver_step -- torch binding: adapts tensors to the torch-free kernels, checks
// the inputs and registers the private op `fastdiff_C::solver_step` (CPU kernel; CUDA kernel
// when built with CUDA). The public op `fastdiff::solver_step` (fastdiff/ops/solver_step.py)
// validates everything with friendlier messages first and dispatches here for the "cpu" and
// "cuda" backends; these checks are the last line for direct callers.
//
// Layout: every tensor must be dense with x's strides (contiguous or channels_last, or any
// other dense order as long as all agree); the common storage order is treated as flat.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "../common/known_calls.h"
#include "../common/python_functions.h"
#include "../common/torch_dtype.h"
#include "solver_step.h"

#ifdef FASTDIFF_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "solver_step.cuh"
#endif

namespace fastdiff {
namespace solver_step {
namespace {

constexpr const char* kOp = "fastdiff_C::solver_step: ";

DType to_dtype(at::ScalarType t, const char* name) { return scalar_type_to<DType>(t, kOp, name); }

// Same sizes and the same strides wherever a dimension has more than one element (the
// stride of a size-1 dimension never addresses memory).
bool same_layout(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  if (t.sizes() != sizes) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (sizes[d] > 1 && t.stride(d) != strides[d]) return false;
  }
  return true;
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), kOp, name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), kOp, name, " must have shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(same_layout(t, x.sizes(), x.strides()), kOp, name,
              " must have the same memory layout as x (all contiguous or all channels_last): strides ",
              t.strides(), " vs x ", x.strides());
}

const char* slot_ptr(const at::Tensor& history, int64_t slot, int64_t numel) {
  return static_cast<const char*>(history.const_data_ptr()) + slot * numel * history.element_size();
}

Args make_args(const at::Tensor& x, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond,
               const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& noise,
               at::ArrayRef<double> coef, at::IntArrayRef slots, double guidance,
               const std::optional<at::Tensor>& guidance_t, double clamp,
               const at::Tensor& out, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, kOp, "x must be a ", device_type, " tensor, got ", x.device());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), kOp,
              "x must be dense (contiguous or channels_last), got strides ", x.strides());
  TORCH_CHECK(coef.size() == kNumCoefs, kOp, "coef must have 9 entries (p, q, a, b0, b1, b2, b3, c, r), got ",
              coef.size());
  TORCH_CHECK(slots.size() == 4, kOp, "slots must have 4 entries (write, read1, read2, read3), got ",
              slots.size());

  Args a;
  a.numel = x.numel();
  a.model_dtype = to_dtype(model_out.scalar_type(), "model_out");
  a.state_dtype = to_dtype(x.scalar_type(), "x");
  TORCH_CHECK(a.state_dtype == DType::kFloat32 || a.state_dtype == a.model_dtype, kOp,
              "x (the solver state) must be float32 or model_out's dtype ", model_out.scalar_type(), ", got ",
              x.scalar_type());
  const at::ScalarType state = x.scalar_type();
  check_like_x(model_out, "model_out", x, model_out.scalar_type());
  check_like_x(out, "out", x, state);
  if (uncond.has_value()) check_like_x(*uncond, "uncond", x, model_out.scalar_type());
  if (noise.has_value()) check_like_x(*noise, "noise", x, state);

  int64_t num_slots = 0;
  if (history.has_value()) {
    const at::Tensor& h = *history;
    TORCH_CHECK(h.dim() == x.dim() + 1 && h.sizes().slice(1) == x.sizes(), kOp,
                "history must have shape (S, *x.shape) = (S, ", x.sizes(), "), got ", h.sizes());
    TORCH_CHECK(h.device() == x.device(), kOp, "history must be on ", x.device(), ", got ", h.device());
    TORCH_CHECK(h.scalar_type() == state, kOp, "history must have x's dtype ", state, ", got ", h.scalar_type());
    num_slots = h.size(0);
    TORCH_CHECK(num_slots <= 1 || h.stride(0) == a.numel, kOp,
                "history slots must be dense and adjacent (stride(0) == x.numel() = ", a.numel, "), got ",
                h.stride(0));
    bool slot_layout = true;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (x.size(d) > 1 && h.stride(d + 1) != x.stride(d)) slot_layout = false;
    }
    TORCH_CHECK(slot_layout, kOp, "history[s] must have the same memory layout as x: strides ", h.strides(),
                " vs x ", x.strides());
  }
  for (size_t k = 0; k < 4; ++k) {
    TORCH_CHECK(slots[k] == -1 || (slots[k] >= 0 && slots[k] < num_slots), kOp, "slots[", k, "] = ", slots[k],
                " must be -1 (unused) or a history slot in [0, ", num_slots, ")");
  }

  a.x = x.const_data_ptr();
  a.model = model_out.const_data_ptr();
  a.uncond = uncond.has_value() ? uncond->const_data_ptr() : nullptr;
  a.noise = noise.has_value() ? noise->const_data_ptr() : nullptr;
  a.out = out.mutable_data_ptr();
  for (int k = 0; k < 3; ++k) {
    a.hist_read[k] = slots[k + 1] >= 0 ? slot_ptr(*history, slots[k + 1], a.numel) : nullptr;
  }
  a.hist_write = slots[0] >= 0 ? static_cast<char*>(history->mutable_data_ptr()) +
                                     slots[0] * a.numel * history->element_size()
                               : nullptr;
  for (int k = 0; k < kNumCoefs; ++k) a.coef[k] = static_cast<float>(coef[k]);
  a.guidance = static_cast<float>(guidance);
  if (guidance_t.has_value()) {
    const at::Tensor& g = *guidance_t;
    TORCH_CHECK(g.numel() == 1 && g.scalar_type() == at::kFloat && g.device() == x.device(), kOp,
                "guidance_t must be a one-element float32 tensor on ", x.device(), ", got ", g.sizes(), " ",
                g.scalar_type(), " on ", g.device());
    a.guidance_ptr = g.const_data_ptr<float>();
  }
  a.clamp = static_cast<float>(clamp);
  const char* err = check_args(a);
  TORCH_CHECK(err == nullptr, kOp, err);
  return a;
}

void solver_step_cpu_impl(const at::Tensor& x, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond,
                          const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& noise,
                          at::ArrayRef<double> coef, at::IntArrayRef slots, double guidance,
               const std::optional<at::Tensor>& guidance_t, double clamp,
                          const at::Tensor& out) {
  const Args a =
      make_args(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out, c10::kCPU);
  solver_step_cpu(a, at::get_num_threads());
}

#ifdef FASTDIFF_WITH_CUDA
void solver_step_cuda_impl(const at::Tensor& x, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond,
                           const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& noise,
                           at::ArrayRef<double> coef, at::IntArrayRef slots, double guidance,
               const std::optional<at::Tensor>& guidance_t, double clamp,
                           const at::Tensor& out) {
  const Args a =
      make_args(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(solver_step_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
}
#endif

// --- fastdiff.solver_step()'s fast path (common/known_calls.h) ---------------------------------

namespace py = pybind11;

struct KnownStep {
  // fastdiff.solver_step(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out,
  // backend) as its wrapper received it: model_out may be CFG-doubled, out None, guidance a
  // number or a tensor
  struct Call {
    const at::Tensor* x;
    const at::Tensor* model_out;
    const at::Tensor* uncond;
    const at::Tensor* history;
    const at::Tensor* noise;
    const at::Tensor* out;
    const at::Tensor* guidance_t = nullptr;
    std::array<double, kNumCoefs> coef;
    std::array<int64_t, 4> slots;
    double guidance = 1.0;
    double clamp;
    known_calls::Backend backend;
  };
  static constexpr size_t kOut = 9;

  static bool read(const py::args& a, Call& c, known_calls::Key& key) {
    using namespace known_calls;
    if (a.size() != 11 || !read_tensor(a[0].ptr(), c.x, false) || !read_tensor(a[1].ptr(), c.model_out, false) ||
        !read_tensor(a[2].ptr(), c.uncond, true) || !read_tensor(a[3].ptr(), c.history, true) ||
        !read_tensor(a[4].ptr(), c.noise, true) || !read_doubles(a[5].ptr(), c.coef.data(), kNumCoefs) ||
        !read_ints(a[6].ptr(), c.slots.data(), 4) || !read_double(a[8].ptr(), c.clamp) ||
        !read_tensor(a[kOut].ptr(), c.out, true) || !read_backend(a[10].ptr(), c.backend)) {
      return false;
    }
    if (!read_double(a[7].ptr(), c.guidance)) {  // a tensor guidance is read by the kernel
      if (!read_tensor(a[7].ptr(), c.guidance_t, false)) return false;
      c.guidance = 1.0;
    }
    for (const at::Tensor* t : {c.x, c.model_out, c.uncond, c.history, c.noise, c.out, c.guidance_t}) key.tensor(t);
    for (const double v : c.coef) key.number(v);
    for (const int64_t s : c.slots) key.word(s);
    key.number(c.guidance);
    key.number(c.clamp);
    key.backend_choice(c.backend);
    return true;
  }

  static at::Tensor run(const Call& c) {
    using known_calls::optional;
    at::Tensor model = *c.model_out;
    std::optional<at::Tensor> model_u = optional(c.uncond);
    const int64_t batch = c.x->size(0);
    if (!model_u.has_value() && batch > 0 && model.size(0) == 2 * batch) {  // CFG-doubled: (uncond, cond)
      model_u = model.narrow(0, 0, batch);
      model = model.narrow(0, batch, batch);
    }
    at::Tensor out = c.out != nullptr ? *c.out : at::empty_like(*c.x);
#ifdef FASTDIFF_WITH_CUDA
    if (c.x->is_cuda()) {
      solver_step_cuda_impl(*c.x, model, model_u, optional(c.history), optional(c.noise), c.coef, c.slots,
                            c.guidance, optional(c.guidance_t), c.clamp, out);
      return out;
    }
#endif
    solver_step_cpu_impl(*c.x, model, model_u, optional(c.history), optional(c.noise), c.coef, c.slots, c.guidance,
                         optional(c.guidance_t), c.clamp, out);
    return out;
  }
};

[[maybe_unused]] const bool added =
    add_python_functions([](py::module_& m) { known_calls::define<KnownStep>(m, "solver_step"); });

}  // namespace
}  // namespace solver_step
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_C, m) {
  m.def(
      "solver_step(Tensor x, Tensor model_out, Tensor? uncond, Tensor(a!)? history, Tensor? noise, "
      "float[] coef, int[] slots, float guidance, Tensor? guidance_t, float clamp, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) { m.impl("solver_step", &fastdiff::solver_step::solver_step_cpu_impl); }

#ifdef FASTDIFF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdiff_C, CUDA, m) { m.impl("solver_step", &fastdiff::solver_step::solver_step_cuda_impl); }
#endif
