// fastdiff -- small CUDA helpers shared by the .cu kernels. Torch-free.
//
// The kernels launch through cudaLaunchKernelEx, not <<<>>>, and reach dynamic shared memory
// through dynamic_shared(): the same sources then also compile as plain C++ against
// csrc/cuda_on_cpu, which runs them on the CPU in the tests.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <utility>

namespace fastdiff {

// Multiprocessor count of the current device, cached per device (1 if it cannot be queried).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < kMaxDevices) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// kernel<<<grid, block, smem, stream>>>(args...); returns the launch status.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// The launch's dynamic shared memory (16-byte aligned).
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef CUDA_ON_CPU
  return static_cast<T*>(cuda_on_cpu::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char fastdiff_dynamic_shared[];
  return reinterpret_cast<T*>(fastdiff_dynamic_shared);
#endif
}

}  // namespace fastdiff
