// fastdiff._C -- the Python module of the compiled extension.
//
// Ops register themselves with the torch dispatcher from their own binding files
// (csrc/<op>/<op>_binding.cpp: TORCH_LIBRARY_FRAGMENT(fastdiff_C, m) + TORCH_LIBRARY_IMPL for
// CPU/CUDA) and add their Python functions (common/python_functions.h); importing this module
// loads them. setup.py compiles every csrc/*/*.cpp and csrc/*/*.cu, so a new op adds its folder
// and nothing here. This file defines those functions and reports how the extension was built
// (fastdiff.info() shows it).
#include <pybind11/pybind11.h>

#include <vector>

#include "common/cpu_isa.h"
#include "common/python_functions.h"

#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#ifdef FASTDIFF_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define FASTDIFF_STR_(...) #__VA_ARGS__
#define FASTDIFF_STR(...) FASTDIFF_STR_(__VA_ARGS__)

namespace py = pybind11;

namespace fastdiff {
namespace {

std::vector<PythonFunctions>& python_functions() {
  static std::vector<PythonFunctions> all;  // filled by the bindings' static initialisers
  return all;
}

}  // namespace

bool add_python_functions(PythonFunctions define) {
  python_functions().push_back(define);
  return true;
}

void define_python_functions(py::module_& m) {
  for (const PythonFunctions define : python_functions()) define(m);
}

}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (ops are registered under torch.ops.fastdiff_C)";
  fastdiff::define_python_functions(m);
  m.def("build_info", []() {
    py::dict d;
#ifdef FASTDIFF_WITH_CUDA
    d["cuda"] = true;
    d["cuda_runtime_version"] = CUDART_VERSION;
#ifdef FASTDIFF_CUDA_ARCHS
    d["cuda_archs"] = FASTDIFF_STR(FASTDIFF_CUDA_ARCHS);
#else
    d["cuda_archs"] = "";
#endif
#else
    d["cuda"] = false;
    d["cuda_runtime_version"] = py::none();
    d["cuda_archs"] = "";
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef TORCH_VERSION
    d["torch_version"] = TORCH_VERSION;  // the torch headers it was compiled against
#endif
    d["compiler"] = __VERSION__;
    // The variant of the multiversioned CPU kernels this machine runs (FASTDIFF_CPU_ISA caps it).
    d["cpu_isa"] = fastdiff::cpu_isa_name(fastdiff::cpu_isa());
    return d;
  });
}
