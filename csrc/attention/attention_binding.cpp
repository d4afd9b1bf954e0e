// fastdiff::attention -- the compiled fast path of fastdiff.attention() (common/known_calls.h).
// The op itself has no compiled kernel of its own: its "cpu" and "cuda" backends are PyTorch's
// SDPA (fastdiff/ops/attention.py). A call the wrapper checked in full and ran on SDPA runs here
// the next time, straight into ATen: SDPA's result as it is when it already has the heads-last
// layout (B, Lq, H, D memory) and no out was given, else copied into out (or a new heads-last
// buffer), exactly as the Python backend does.
#include <ATen/ATen.h>

#include <cmath>

#include "../common/known_calls.h"
#include "../common/python_functions.h"

namespace fastdiff {
namespace attention {
namespace {

namespace py = pybind11;

struct KnownAttention {
  // fastdiff.attention(q, k, v, scale, out, backend) as its wrapper received it (scale and out
  // may be None)
  struct Call {
    const at::Tensor* q;
    const at::Tensor* k;
    const at::Tensor* v;
    std::optional<double> scale;
    const at::Tensor* out;
    known_calls::Backend backend;
  };
  static constexpr size_t kOut = 4;

  // Without out the result is new and overlaps nothing: the key leaves every pointer out (a
  // U-Net's activations sit at new addresses at every call).
  static bool read(const py::args& a, Call& c, known_calls::Key& key) {
    using namespace known_calls;
    double scale = 0.0;
    if (a.size() != 6 || !read_tensor(a[0].ptr(), c.q, false) || !read_tensor(a[1].ptr(), c.k, false) ||
        !read_tensor(a[2].ptr(), c.v, false) || !read_tensor(a[kOut].ptr(), c.out, true) ||
        !read_backend(a[5].ptr(), c.backend) || !(a[3].is_none() || read_double(a[3].ptr(), scale))) {
      return false;
    }
    if (!a[3].is_none()) c.scale = scale;
    const bool pointers = c.out != nullptr;
    for (const at::Tensor* t : {c.q, c.k, c.v, c.out}) key.tensor(t, pointers);
    key.word(c.scale.has_value());
    key.number(scale);
    key.backend_choice(c.backend);
    return true;
  }

  static at::Tensor run(const Call& c) {
    const at::Tensor& q = *c.q;
    auto heads_last = [&q]() {  // (B, H, Lq, D) over (B, Lq, H, D) memory
      return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
    };
    if (q.numel() == 0) return c.out != nullptr ? *c.out : heads_last();
    const double scale = c.scale.has_value() ? *c.scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
    at::Tensor o = at::scaled_dot_product_attention(q, *c.k, *c.v, std::nullopt, 0.0, false, scale);
    if (c.out == nullptr && o.transpose(1, 2).is_contiguous()) return o;
    at::Tensor out = c.out != nullptr ? *c.out : heads_last();
    out.copy_(o);
    return out;
  }
};

[[maybe_unused]] const bool added =
    add_python_functions([](py::module_& m) { known_calls::define<KnownAttention>(m, "attention"); });

}  // namespace
}  // namespace attention
}  // namespace fastdiff
