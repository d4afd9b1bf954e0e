// fastdiff -- validate once, run many, in C++ (the ops' Python wrappers' fast path).
//
// A sampling loop calls an op with the same tensors and numbers at every step. The op's Python
// wrapper (fastdiff/ops/<op>.py) checks a call in full the first time it sees it; when the
// backend it chose is a compiled one ("cpu"/"cuda"), it then records the call's signature here
// (`<op>_learn`), and later calls with the same signature run from the wrapper's first line
// (`<op>_known`): no Python checks, no torch dispatcher. Building the signature key in Python
// cost about as much as the kernel launch itself.
//
// The key holds everything the wrapper's checks and backend choice read: each tensor's pointer
// (the overlap checks), sizes, strides, dtype, device and dispatch key set, the numbers, the
// backend name and TRITON_INTERPRET. Only plain eager calls qualify, as for
// fastdiff/ops/_dispatch.py's direct(): exact torch.Tensor / nn.Parameter objects, no dispatch
// or function mode, no functorch transform (the wrapper tests torch.compile tracing itself).
// Anything else -- a subclass, a NumPy number, a mode -- is "not plain": the wrapper takes its
// full path, which raises or handles it.
//
// Needs torch and Python: include from the op bindings (*_binding.cpp) only.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

namespace fastdiff {
namespace known_calls {

// Backend names a compiled provider can be chosen under (the others never learn).
enum class Backend : int64_t { kAuto = 0, kCuda = 1, kCpu = 2 };

// One call's signature, as 64-bit words.
class Key {
 public:
  Key() { words_.reserve(96); }
  void word(int64_t w) { words_.push_back(w); }
  void number(double v);
  // `t` may be null (None); no pointer for a new output's key (nothing can overlap it)
  void tensor(const at::Tensor* t, bool with_pointer = true);
  // What the backend choice reads: the backend named and TRITON_INTERPRET (every key ends so,
  // as the Python keys end with signature_env())
  void backend_choice(Backend b);
  const std::vector<int64_t>& words() const { return words_; }

 private:
  void env(const char* name);  // the variable's value; unset differs from empty
  std::vector<int64_t> words_;
};

// The learned signatures of one op. Bounded (forgotten when full: a loop uses a few dozen).
// Read and written with the GIL held.
class Set {
 public:
  bool contains(const Key& k) const { return set_.count(k.words()) != 0; }
  void insert(const Key& k);

 private:
  struct Hash {
    size_t operator()(const std::vector<int64_t>& w) const;
  };
  std::unordered_set<std::vector<int64_t>, Hash> set_;
};

// No dispatch mode, no torch function mode, no functorch transform active.
bool plain_eager();

// Python argument readers: false when `o` is not of the plain kind.
// A tensor: an exact torch.Tensor or nn.Parameter whose key set has no wrapper or Python keys;
// None gives nullptr when allow_none.
bool read_tensor(PyObject* o, const at::Tensor*& t, bool allow_none);
bool read_double(PyObject* o, double& v);  // a float (or subclass) or an int, not a bool
bool read_int(PyObject* o, int64_t& v);    // an int, not a bool
bool read_bool(PyObject* o, bool& v);      // True or False
bool read_backend(PyObject* o, Backend& b);  // "auto", "cuda" or "cpu"
bool read_doubles(PyObject* seq, double* v, size_t n);  // a list/tuple of n read_double's
bool read_ints(PyObject* seq, int64_t* v, size_t n);    // a list/tuple of n read_int's

inline std::optional<at::Tensor> optional(const at::Tensor* t) {
  return t == nullptr ? std::nullopt : std::optional<at::Tensor>(*t);
}

// Defines an op's Python functions `<name>_known(*args)` and `<name>_learn(*args)`, called with
// the arguments its wrapper received. `Op` provides
//   struct Call { ... const at::Tensor* out; ... };          the call, read from them
//   static constexpr size_t kOut;                            where out is among the arguments
//   static bool read(const pybind11::args&, Call&, Key&);    a plain call and its signature
//   static at::Tensor run(const Call&);                      runs it, into out or a new output
// `_known` runs a learned call and returns out (the caller's object, or the new output), else
// returns None having done nothing; `_learn` records a call the wrapper checked in full and
// chose the compiled backend for.
template <class Op>
void define(pybind11::module_& m, const std::string& name) {
  namespace py = pybind11;
  static Set learned;
  m.def((name + "_known").c_str(), [](const py::args& args) -> py::object {
    typename Op::Call c;
    Key key;
    if (!plain_eager() || !Op::read(args, c, key) || !learned.contains(key)) return py::none();
    at::Tensor result;
    {
      const py::gil_scoped_release no_gil;
      result = Op::run(c);
    }
    if (c.out != nullptr) return py::reinterpret_borrow<py::object>(args[Op::kOut]);
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(result)));
  }, ("fastdiff." + name + "()'s fast path: run a learned call and return out, else return None").c_str());
  m.def((name + "_learn").c_str(), [](const py::args& args) {
    typename Op::Call c;
    Key key;
    if (plain_eager() && Op::read(args, c, key)) learned.insert(key);
  }, ("record a call fastdiff." + name + "() checked in full").c_str());
}

}  // namespace known_calls
}  // namespace fastdiff
