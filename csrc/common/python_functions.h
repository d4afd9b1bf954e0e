// fastdiff -- the extension's Python functions besides the registered ops (torch.ops.fastdiff_C).
// Each op's binding file adds its own with
//     static const bool added = fastdiff::add_python_functions(&define);
// and the module's init (csrc/bindings.cpp) defines them all, so a new op still adds its folder
// and nothing in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace fastdiff {

using PythonFunctions = void (*)(pybind11::module_&);
bool add_python_functions(PythonFunctions define);
void define_python_functions(pybind11::module_& m);

}  // namespace fastdiff
