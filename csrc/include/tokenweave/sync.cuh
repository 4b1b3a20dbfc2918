// Cross-GPU synchronisation primitives: flags, the bounded wait, and error reporting.
//
// Memory-ordering pattern (the same for every phase of every kernel):
//   producer: every thread of the CTA stores its data (weak st.global, local or to a peer)
//             -> __syncthreads()                     (orders the CTA's stores before thread t's release)
//             -> thread 0: fence.acq_rel.sys         (cumulative over what the barrier ordered)
//             -> thread 0: st.relaxed.sys flag, to every rank (fence + relaxed store = a release pattern)
//   consumer: thread t: ld.acquire.sys flag == want  (spins, bounded by globaltimer)
//             -> __syncthreads_and(ok)               (the whole CTA may now read the data)
// System scope is required: the flag and the data cross the NVLink fabric between GPUs.
// An acquire at .sys scope also invalidates this SM's L1, so later plain loads see the peer's data.
#pragma once

#include "tokenweave/common.cuh"

namespace tokenweave {

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_acquire_sys_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Read by a stream memory operation (cuStreamWaitValue32) rather than by a thread: .sys because the
// front end that polls it is outside the SMs.
__device__ __forceinline__ void st_release_sys_u32(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A flag carries the epoch of the call in its low word and the call's signature in its high word,
// so one acquire both synchronises and checks that the peer is making the same call.
__device__ __forceinline__ uint64_t make_flag(uint32_t epoch, uint32_t sig) {
  return (uint64_t(sig) << 32) | epoch;
}

__device__ __forceinline__ bool aborted(const CommDevice& c) {
  return *reinterpret_cast<volatile uint32_t*>(&c.state->abort) != 0;
}

// First error wins the record; every error sets `abort` so the other CTAs stop waiting too.
__device__ inline void record_error(const CommDevice& c, int64_t code, int peer, uint32_t epoch,
                                    int chunk, uint32_t sig, uint32_t op, uint64_t seen) {
  if (atomicCAS(&c.state->claimed, 0u, 1u) == 0u) {
    volatile ErrorRecord* r = c.err;
    r->rank = c.rank;
    r->peer = peer;
    r->epoch = epoch;
    r->chunk = chunk;
    r->own_sig = sig;
    r->peer_sig = int64_t(seen >> 32);
    r->op = op;
    __threadfence_system();
    r->code = code;
    __threadfence_system();
  }
  atomicExch(&c.state->abort, 1u);
}

struct CallId {
  uint32_t epoch;
  uint32_t sig;
  uint32_t op;
};

// Spins until `flag` holds this call's epoch. Bounded: gives up after c.timeout_ns, or at once when
// another CTA of this rank has already failed. Returns false after recording why.
__device__ inline bool wait_flag(const CommDevice& c, const uint64_t* flag, const CallId& id, int peer,
                                 int chunk) {
  const uint64_t start = globaltimer_ns();
  for (uint32_t spin = 0;; ++spin) {
    const uint64_t v = ld_acquire_sys(flag);
    if (uint32_t(v) == id.epoch) {
      if (uint32_t(v >> 32) == id.sig) return true;
      record_error(c, kErrMismatch, peer, id.epoch, chunk, id.sig, id.op, v);
      return false;
    }
    // Reading the timer and the abort word costs more than a flag poll: do it every 64 polls.
    if ((spin & 63) == 63) {
      if (aborted(c)) return false;
      if (globaltimer_ns() - start > c.timeout_ns) {
        record_error(c, kErrTimeout, peer, id.epoch, chunk, id.sig, id.op, v);
        return false;
      }
    }
  }
}

// Polls done() until it holds (true). Bounded: false at once when another CTA of this rank has failed,
// or after c.timeout_ns, having called on_timeout() to record why. Reading the timer and the abort word
// costs more than a poll: they are read every 64 polls.
template <class Done, class OnTimeout>
__device__ __forceinline__ bool spin_bounded(const CommDevice& c, const Done& done, const OnTimeout& on_timeout) {
  const uint64_t start = globaltimer_ns();
  for (uint32_t spin = 0;; ++spin) {
    if (done()) return true;
    if ((spin & 63) == 63) {
      if (aborted(c)) return false;
      if (globaltimer_ns() - start > c.timeout_ns) {
        on_timeout();
        return false;
      }
    }
  }
}

// Track-and-trigger, consumer side. The producer (a GEMM on another stream of this GPU, then a mark
// kernel) adds `pieces` to ready[chunk] with red.release.gpu once the chunk's rows are written; this
// acquire at gpu scope then makes them visible to the CTA. Bounded like every wait; gives up at once
// after any error on this rank. consumed[chunk] is this rank's own (one CTA owns a chunk per call).
__device__ inline bool wait_ready(const CommDevice& c, const uint32_t* ready, uint32_t* consumed, int chunk,
                                  uint32_t pieces, const CallId& id) {
  bool ok = true;
  if (threadIdx.x == 0) {
    const uint32_t want = consumed[chunk] + pieces;
    ok = spin_bounded(
        c, [&] { return int32_t(ld_acquire_gpu(ready + chunk) - want) >= 0; },  // wrap-safe: counters only grow
        [&] { record_error(c, kErrProducerTimeout, c.rank, id.epoch, chunk, id.sig, id.op, 0); });
    if (ok) consumed[chunk] = want;
  }
  return __syncthreads_and(ok) != 0;
}

// Flag of (phase, src, chunk) for the call's parity inside the workspace at `base`.
__device__ __forceinline__ uint64_t* flag_ptr(char* base, const Layout& l, int parity, int phase, int src,
                                              int chunk) {
  uint64_t* f = reinterpret_cast<uint64_t*>(base + l.flags_off);
  return f + ((size_t(parity) * 2 + phase) * kMaxWorld + src) * kMaxChunks + chunk;
}

// The release of a flag by one thread, once everything it must publish is ordered before it (by a barrier,
// or by its own program order): one cumulative fence, then W relaxed flag stores to every rank (itself
// included). W separate st.release would cost W system-scope fences for the same ordering.
template <int W>
__device__ __forceinline__ void post_flags(const CommDevice& c, const CallId& id, int phase, int chunk) {
  fence_acq_rel_sys();
#pragma unroll
  for (int q = 0; q < W; ++q)
    st_relaxed_sys(flag_ptr(c.ws[q], c.layout, id.epoch & 1, phase, c.rank, chunk), make_flag(id.epoch, id.sig));
}

// Producer side: after the whole CTA stored its part of `chunk`, tell every rank. Tr is the transport: its
// fence_before_signal() orders its own kind of stores before the release; the barrier orders every thread's
// stores before thread 0's fence (cumulative).
// kWorkersOnly: the CTA has a copy warp that does not take part (data_sync, common.cuh).
template <class Tr, int W, bool kWorkersOnly = false>
__device__ __forceinline__ void signal_all(const CommDevice& c, const CallId& id, int phase, int chunk) {
  Tr::fence_before_signal();
  data_sync<kWorkersOnly>();
  if (threadIdx.x == 0) post_flags<W>(c, id, phase, chunk);
}

// Consumer side: every rank's part of `chunk` has arrived (or the CTA must give up: returns false).
template <int W, bool kWorkersOnly = false>
__device__ __forceinline__ bool wait_all(const CommDevice& c, const CallId& id, int phase, int chunk) {
  bool ok = true;
  if (threadIdx.x < W) {
    ok = wait_flag(c, flag_ptr(c.ws[c.rank], c.layout, id.epoch & 1, phase, threadIdx.x, chunk), id,
                   threadIdx.x, chunk);
  }
  return data_sync_and<kWorkersOnly>(ok);
}

// Copy-engine feed, consumer side: thread q waits until source q's copy engine raised our staged flag
// of `chunk` (a 4-byte copy that the copy stream orders after the chunk's data copies: stream order
// completes the data before the flag is written), then lowers it again for the next call. Lowering is
// safe before the data is read: a source writes the flag again only in its next call, which starts
// after its handshake with us, i.e. after this call ended here.
template <int W>
__device__ __forceinline__ bool wait_staged(const CommDevice& c, const CallId& id, int chunk) {
  bool ok = true;
  if (threadIdx.x < W) {
    uint32_t* flag = reinterpret_cast<uint32_t*>(c.ws[c.rank] + c.layout.staged_off) + threadIdx.x * kMaxChunks + chunk;
    ok = spin_bounded(
        c, [&] { return ld_acquire_sys_u32(flag) == 1u; },
        [&] { record_error(c, kErrTimeout, threadIdx.x, id.epoch, chunk, id.sig, id.op, 0); });
    if (ok) *flag = 0u;
  }
  return __syncthreads_and(ok) != 0;
}

}  // namespace tokenweave
