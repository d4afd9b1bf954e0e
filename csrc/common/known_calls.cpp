// fastdiff -- validate once, run many, in C++: see known_calls.h.
#include "known_calls.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fastdiff {
namespace known_calls {
namespace {

constexpr size_t kMaxSignatures = 256;
constexpr int64_t kNone = -1;

// Tensors the kernels cannot read as plain strided memory, or that other dispatch keys must see
// (wrappers, lazy conjugation/negation, zero tensors, sparse, quantized, nested).
const c10::DispatchKeySet kNotPlain({
    c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
    c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Batched,
    c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::Conjugate, c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor, c10::DispatchKey::Sparse, c10::DispatchKey::SparseCsr,
    c10::DispatchKey::Quantized, c10::DispatchKey::NestedTensor});

}  // namespace

void Key::number(double v) {
  int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  words_.push_back(bits);
}

void Key::tensor(const at::Tensor* t, bool with_pointer) {
  if (t == nullptr) {
    words_.push_back(kNone);
    return;
  }
  words_.push_back(t->dim());
  for (const int64_t n : t->sizes()) words_.push_back(n);
  for (const int64_t s : t->strides()) words_.push_back(s);
  words_.push_back(static_cast<int64_t>(t->scalar_type()));
  words_.push_back(static_cast<int64_t>(t->device().type()));
  words_.push_back(t->device().index());
  words_.push_back(static_cast<int64_t>(t->key_set().raw_repr()));
  if (with_pointer) words_.push_back(reinterpret_cast<int64_t>(t->data_ptr()));
}

void Key::backend_choice(Backend b) {
  words_.push_back(static_cast<int64_t>(b));
  env("TRITON_INTERPRET");
}

void Key::env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) {
    words_.push_back(kNone);
    return;
  }
  const size_t n = std::strlen(v);
  words_.push_back(static_cast<int64_t>(n));
  for (size_t i = 0; i < n; i += sizeof(int64_t)) {
    int64_t w = 0;
    std::memcpy(&w, v + i, std::min(sizeof w, n - i));
    words_.push_back(w);
  }
}

void Set::insert(const Key& k) {
  if (set_.size() >= kMaxSignatures) set_.clear();
  set_.insert(k.words());
}

size_t Set::Hash::operator()(const std::vector<int64_t>& w) const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
  for (const int64_t x : w) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
  return static_cast<size_t>(h);
}

bool plain_eager() {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::impl::torch_function_mode_enabled()) return false;
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

bool read_tensor(PyObject* o, const at::Tensor*& t, bool allow_none) {
  if (o == Py_None) {
    t = nullptr;
    return allow_none;
  }
  if (!THPVariable_CheckExact(o)) return false;
  t = &THPVariable_Unpack(o);
  return t->defined() && !t->key_set().has_any(kNotPlain);
}

bool read_double(PyObject* o, double& v) {
  if (PyFloat_Check(o)) {
    v = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (!PyLong_Check(o) || PyBool_Check(o)) return false;
  v = PyLong_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {  // too large for a double: the full path says so
    PyErr_Clear();
    return false;
  }
  return true;
}

bool read_int(PyObject* o, int64_t& v) {
  if (!PyLong_Check(o) || PyBool_Check(o)) return false;
  int overflow = 0;
  v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool read_bool(PyObject* o, bool& v) {
  if (o != Py_True && o != Py_False) return false;
  v = o == Py_True;
  return true;
}

bool read_backend(PyObject* o, Backend& b) {
  if (!PyUnicode_Check(o)) return false;
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == nullptr) {
    PyErr_Clear();
    return false;
  }
  const std::string name(s, static_cast<size_t>(n));
  if (name == "auto") b = Backend::kAuto;
  else if (name == "cuda") b = Backend::kCuda;
  else if (name == "cpu") b = Backend::kCpu;
  else return false;
  return true;
}

namespace {

template <class T, class Read>
bool read_sequence(PyObject* seq, T* v, size_t n, Read read) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  if (static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)) != n) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (size_t i = 0; i < n; ++i) {
    if (!read(items[i], v[i])) return false;
  }
  return true;
}

}  // namespace

bool read_doubles(PyObject* seq, double* v, size_t n) { return read_sequence(seq, v, n, read_double); }
bool read_ints(PyObject* seq, int64_t* v, size_t n) { return read_sequence(seq, v, n, read_int); }

}  // namespace known_calls
}  // namespace fastdiff
