// Bulk copies (TMA, sm_90): cp.async.bulk global -> shared and shared -> global, issued by one thread.
//
// One instruction moves up to a stage of bytes, done by the SM's copy engine (TMA) instead of 16-byte
// loads and stores from every thread, so a single warp keeps many kilobytes in flight while the other
// warps of the CTA compute. Used by lean_bulk's copy warp (csrc/kernels/lean.cuh).
//
// Memory-ordering pattern:
//   load  : mbarrier.arrive.expect_tx(bar, n) -> cp.async.bulk ... mbarrier::complete_tx [bar]
//           -> try_wait.parity(bar) (acquire, CTA scope): the n bytes are in shared memory
//   store : cp.async.bulk.global.shared::cta.bulk_group -> commit_group
//           wait_group.read N: the source stage may be overwritten (only its read is done)
//           wait_group 0     : the stores are complete (visible to the issuing thread)
//   publish: wait_group 0 -> fence.proxy.async.global (the async proxy's writes ordered before this thread's
//           generic accesses) -> the flag release of sync.cuh (fence.acq_rel.sys + relaxed flag stores)
// Addresses and sizes must be multiples of 16 bytes (x rows are: hidden % 8 == 0 and 16-byte vectors).
#pragma once

#include <cstdint>

namespace tokenweave {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// The barriers' initialisation visible to the async proxy (the bulk copies complete on them).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Arrive once and expect `bytes` more of transactions before the phase completes.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Whether the phase of parity `parity` has completed (acquire, CTA scope). Non-blocking beyond the
// hardware's own short suspend: the caller bounds its loop.
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(smem_dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

__device__ __forceinline__ void bulk_store(void* dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(smem_src)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// At most N of this thread's committed store groups still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Every committed store group of this thread is complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

}  // namespace tokenweave
