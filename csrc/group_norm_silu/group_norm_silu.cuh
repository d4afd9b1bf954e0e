// fastdiff::group_norm_silu -- CUDA launcher. Torch-free: include with nvcc or any host compiler
// that has the CUDA runtime headers; the contract is in group_norm_silu.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "group_norm_silu.h"

namespace fastdiff {
namespace group_norm_silu {

// A block keeps scale, shift and the temb offset of every channel of its group in shared
// memory (3 * 4 bytes per channel, plus a little): at most 4000 channels stay under the 48 KiB
// a launch gets without opting in.
constexpr int64_t kCudaMaxChannelsPerGroup = 4000;

// check_args plus the CUDA kernel's own limit; nullptr when it can run `a`.
inline const char* check_cuda_args(const Args& a) {
  if (const char* err = check_args(a)) return err;
  if (a.C / a.groups > kCudaMaxChannelsPerGroup) return "the CUDA kernel takes at most 4000 channels per group";
  return nullptr;
}

// Chunks per group (1: the fused one-kernel path) for `a` on the current device: `a.num_splits`
// when > 0 (capped by the group size), else a heuristic that aims for 4 blocks per SM.
int64_t group_norm_silu_cuda_splits(const Args& a);

// Bytes of device workspace group_norm_silu_cuda needs for `a` (0 when no group is split).
size_t group_norm_silu_cuda_workspace_bytes(const Args& a);

// Enqueues the kernel(s) on `stream` (graph-capturable: no allocation, no synchronisation):
// one fused kernel when groups are not split, else partial statistics + normalise.
// `workspace` must hold group_norm_silu_cuda_workspace_bytes(a) bytes, 16-byte aligned.
// Returns cudaErrorInvalidValue for an invalid `a` (check_cuda_args) or a missing workspace,
// else the launch status.
cudaError_t group_norm_silu_cuda(const Args& a, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace group_norm_silu
}  // namespace fastdiff
