// fastdiff::solver_step -- CUDA launcher. Torch-free: include with nvcc or any host compiler
// that has the CUDA runtime headers; the contract is in solver_step.h.
#pragma once

#include <cuda_runtime_api.h>

#include "solver_step.h"

namespace fastdiff {
namespace solver_step {

// Enqueues the kernel on `stream` (graph-capturable: no allocation, no synchronisation).
// Uses 16-byte vector loads/stores when every pointer is 16-byte aligned, else the scalar
// path. Returns cudaErrorInvalidValue for an invalid `a` (see check_args), else the launch
// status.
cudaError_t solver_step_cuda(const Args& a, cudaStream_t stream);

// Whether solver_step_cuda would take the vectorised path for these pointers.
bool solver_step_cuda_vectorized(const Args& a);

}  // namespace solver_step
}  // namespace fastdiff
