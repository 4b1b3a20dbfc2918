// Programmatic dependent launch (PDL, sm_90): the launch of a kernel overlaps the end of the kernel before
// it in the same stream.
//
// Launched with cudaLaunchAttributeProgrammaticStreamSerialization (launch_kernel below, when enabled), a
// kernel may start once every CTA of the previous kernel in its stream has exited (none of ours triggers
// earlier, so no CTA of ours ever waits for SM room behind a spinning peer), before that kernel's
// completion and memory flush. Its CTAs then run their prologue and block in wait_for_prior_grid() until
// the previous grid has completed and its writes are visible; without the attribute the wait returns at
// once. Memory-ordering rule: before the wait a kernel touches only memory the previous kernel cannot
// write: our kernels compute addresses and prefetch the norm weight into L2, nothing else (not x, which
// the previous kernel usually produces; not the residual or the communicator state, which the previous
// call wrote).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "tokenweave/tokenweave.h"  // set_programmatic_launch / programmatic_launch

namespace tokenweave {

__device__ __forceinline__ void wait_for_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Pulls `bytes` at p into L2 (one 128-byte line per thread of the CTA, strided): issued before the wait,
// the weight's first read after it hits L2 instead of HBM.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  if (p == nullptr) return;
  const char* c = static_cast<const char*>(p);
  for (int64_t off = int64_t(threadIdx.x) * 128; off < bytes; off += int64_t(blockDim.x) * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
}

// <<<grid, block, smem_bytes, stream>>>(args...), with the PDL attribute when programmatic_launch().
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                               Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = programmatic_launch() ? 1 : 0;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// <<<grid, block, 0, stream>>>(args...), with the PDL attribute when programmatic_launch().
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  return launch_kernel_smem(kernel, grid, block, 0, stream, std::forward<Args>(args)...);
}

}  // namespace tokenweave
