// fastdiff -- torch-side helper shared by the op bindings (*_binding.cpp). Needs torch: include
// it only from bindings, never from the torch-free kernels.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace fastdiff {

// The op's own DType enum (kFloat32, kFloat16, kBFloat16) for a tensor dtype; other dtypes
// throw "<op><name> must be float32, float16 or bfloat16, got <dtype>".
template <class DType>
DType scalar_type_to(c10::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case c10::kFloat: return DType::kFloat32;
    case c10::kHalf: return DType::kFloat16;
    case c10::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

}  // namespace fastdiff
