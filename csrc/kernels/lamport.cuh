// Lamport one-shot: a one-shot all-reduce (+ residual + RMSNorm) with no flags and no fences.
//
// The data is its own flag. Every Lamport buffer starts filled with the sentinel -0.0 in every 2-byte lane
// (0x8000); writers turn a real -0.0 into +0.0, so a lane holding the sentinel has not arrived yet.
// Per call, each rank pushes its (canonicalised) rows of x into its slot of every rank's buffer, then polls
// its own buffer until no lane of the rows it finishes holds the sentinel, sums the W slots in rank order
// (+ residual), and runs the row epilogue: one NVLink crossing and no system-scope fence on the path.
//
// Three buffers rotate by the Lamport sequence k (Lamport calls only): call k writes buffer k % 3 and
// re-fills buffer (k + 2) % 3, which call k - 1 used, with the sentinel. Why that buffer is quiet: a peer
// writes my buffer i only in its calls k with k % 3 == i; I consumed all of call k - 1's data before
// call k started (every vector was polled), and a peer reaches call k + 2 only after my call k + 1 data
// arrived, i.e. after this call and its clearing stores completed (stream order on my side).
// The sum of -0.0 terms may come out +0.0 here where the flagged algorithms give -0.0: the only
// difference from them; every rank still gets the same bits.
//
// Mismatches: each slot starts with a header vector (call signature + sequence, never a sentinel lane);
// every CTA checks every peer's header before it reads that peer's data, so ranks making different calls
// fail with a mismatch instead of reading each other's rows. Every poll is bounded (timeout, abort).
#pragma once

#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"
#include "tokenweave/transport.cuh"
#include "call.cuh"

namespace tokenweave {

constexpr uint32_t kLamportSentinelWord = 0x80008000u;
// Vectors per thread of a row: the W polled loads of each are live at once, so half of what the other
// epilogues keep (4 x 16 B x 512 threads: hidden up to 16384 for the 2-byte types Lamport takes).
constexpr int kLamportVecs = 4;  // -0.0 in both 2-byte lanes (bf16 and fp16 alike)

__device__ __forceinline__ bool half_is_sentinel(uint32_t h) { return h == 0x8000u; }

__device__ __forceinline__ bool has_sentinel(const Vec& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool s = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) s |= half_is_sentinel(w[i] & 0xffffu) | half_is_sentinel(w[i] >> 16);
  return s;
}

// -0.0 -> +0.0 in each 2-byte lane: real data never looks like "not arrived".
__device__ __forceinline__ Vec canonicalise(const Vec& v) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if ((w[i] & 0xffffu) == 0x8000u) w[i] &= 0xffff0000u;
    if ((w[i] >> 16) == 0x8000u) w[i] &= 0x0000ffffu;
  }
  return Vec{w[0], w[1], w[2], w[3]};
}

// Polled data lives in another GPU's stores to our memory: bypass L1 on every read of it.
__device__ __forceinline__ Vec ld_volatile(const Vec* p) {
  Vec v;
  asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Slot header: 8 lanes of 9 bits each (0x100 | byte), so no lane is ever the sentinel.
__device__ __forceinline__ Vec lamport_header(uint32_t sig, uint32_t seq) {
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    h[i] = 0x100u | ((sig >> (8 * i)) & 0xffu);
    h[4 + i] = 0x100u | ((seq >> (8 * i)) & 0xffu);
  }
  return Vec{h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16)};
}

__device__ __forceinline__ uint64_t lamport_slot_off(const Layout& l, int buf, int src) {
  return l.lamport_off + (uint64_t(buf) * l.world + src) * l.lamport_slot_bytes;
}

// z from the W slots of this call's buffer: each vector is polled until no lane holds the sentinel (my own
// part is read from x, canonicalised the same way), then summed in rank order + residual. The poll is bounded:
// past the deadline, or once another thread of the CTA or another CTA of this rank failed, it gives up and
// marks `failed` (shared: the peer + 1); the caller then records the error and poisons the rows.
template <typename T, int W>
struct LamportSource {
  const char* slots;  // my buffer, slot 0's header
  uint64_t slot_bytes;
  const Vec* x;
  const Vec* residual;
  int nvr;
  int rank;
  uint64_t deadline;  // globaltimer ns
  const CommDevice* c;
  int* failed;        // shared memory
  __device__ Vec load_z(int64_t row, int j) const {
    constexpr int L = Pack<T>::kLanes;
    const int64_t idx = row * nvr + j;
    Vec v[W];
#pragma unroll
    for (int s = 0; s < W; ++s)
      v[s] = s == rank ? canonicalise(x[idx]) : ld_volatile(reinterpret_cast<const Vec*>(slots + s * slot_bytes + 16) + idx);
    Vec r;
    if (residual) r = residual[idx];
#pragma unroll
    for (int s = 0; s < W; ++s) {
      for (uint32_t spin = 1; s != rank && has_sentinel(v[s]); ++spin) {
        if ((spin & 63) == 0 && (*reinterpret_cast<volatile int*>(failed) != 0 || aborted(*c) ||
                                 globaltimer_ns() > deadline)) {
          atomicCAS(failed, 0, s + 1);
          break;
        }
        v[s] = ld_volatile(reinterpret_cast<const Vec*>(slots + s * slot_bytes + 16) + idx);
      }
    }
    float acc[L];
    sum_in_rank_order<T, W>(v, acc);
    if (residual) add_vec<T>(acc, r);
    return Pack<T>::pack(acc);
  }
};

// The residual is written back only while no poll of this CTA gave up (a failed call must not leave a
// residual built from stale data); out is poisoned afterwards anyway.
struct LamportSink {
  LocalSink local;
  const int* failed;
  __device__ void store_res(int64_t row, int j, const Vec& v) const {
    if (*reinterpret_cast<const volatile int*>(failed) == 0) local.store_res(row, j, v);
  }
  __device__ void store_out(int64_t row, int j, const Vec& v) const { local.store_out(row, j, v); }
};

template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads, 1) lamport_kernel(const CommDevice c, const CallArgs a) {
  using Tr = TransportT<T, W>;
  constexpr int L = Pack<T>::kLanes;
  __shared__ float red[2][kBlockThreads / 32];
  const Layout& l = c.layout;
  const CallId id = begin_call<T>(c, a);
  const uint32_t seq = c.state->lamport_seq + 1;
  const int buf = int(seq % 3), stale = int((seq + 2) % 3);
  const int nvr = a.hidden / L;
  const int64_t n_vecs = a.tokens * nvr;
  const int n_mine = chunks_of_this_cta(a);
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };
  auto row_begin = [&](int ch) { return int64_t(ch) * a.chunk_rows; };
  auto row_end = [&](int ch) { return min(int64_t(ch + 1) * a.chunk_rows, a.tokens); };
  const Vec* x = reinterpret_cast<const Vec*>(a.x);
  char* mine = c.ws[c.rank] + lamport_slot_off(l, buf, 0);  // my buffer: W slots, each header + data

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);
  if (blockIdx.x == 0 && threadIdx.x == 0) c.state->lamport_vecs[buf] = uint32_t(n_vecs);  // for call k + 1

  if (ok) {  // push: header (CTA 0) and my chunks' rows into my slot of every rank's buffer
    const uint64_t my_slot = lamport_slot_off(l, buf, c.rank);
    if (blockIdx.x == 0 && threadIdx.x == 0) Tr::broadcast(c, my_slot, lamport_header(a.sig, seq));
    for (int i = 0; i < n_mine; ++i) {
      const int ch = chunk_at(i);
      stream_vecs(
          row_begin(ch) * nvr, row_end(ch) * nvr, [&](int64_t k) { return canonicalise(x[k]); },
          [&](int64_t k, const Vec& v) { Tr::broadcast(c, my_slot + 16 + uint64_t(k) * 16, v); });
    }
    Tr::fence_before_signal();  // multimem: order the multicast stores before peers' unicast reads
  }

  // Every peer's header first (W threads): a peer making another call is a mismatch before any data is read.
  const uint64_t start = globaltimer_ns();
  __shared__ int failed;  // peer + 1 of the first poll of this CTA that gave up
  if (threadIdx.x == 0) failed = 0;
  if (ok && threadIdx.x < W && threadIdx.x != c.rank) {
    const int s = threadIdx.x;
    const Vec* hp = reinterpret_cast<const Vec*>(mine + uint64_t(s) * l.lamport_slot_bytes);
    Vec h = ld_volatile(hp);
    for (uint32_t spin = 1; ok && has_sentinel(h); ++spin) {
      if ((spin & 63) == 0 && (aborted(c) || globaltimer_ns() - start > c.timeout_ns)) {
        if (!aborted(c)) record_error(c, kErrTimeout, s, id.epoch, -1, id.sig, id.op, 0);
        ok = false;
      }
      h = ld_volatile(hp);
    }
    const Vec want = lamport_header(a.sig, seq);
    if (ok && (h.x != want.x || h.y != want.y || h.z != want.z || h.w != want.w)) {
      uint32_t peer_sig = 0;
      const uint32_t hw[2] = {h.x, h.y};
      for (int i = 0; i < 4; ++i) peer_sig |= ((hw[i / 2] >> (16 * (i % 2))) & 0xffu) << (8 * i);
      record_error(c, kErrMismatch, s, id.epoch, -1, id.sig, id.op, uint64_t(peer_sig) << 32);
      ok = false;
    }
  }
  ok = __syncthreads_and(ok) != 0;

  if (ok) {  // the data: polled vector by vector inside the row epilogue (one pass over the slots)
    const RowArgs rows = row_args(a);
    const LamportSource<T, W> src{mine, l.lamport_slot_bytes, x,
                                  (a.op & kOpResidual) ? reinterpret_cast<const Vec*>(a.residual) : nullptr, nvr,
                                  c.rank, start + c.timeout_ns, &c, &failed};
    const LamportSink sink{LocalSink{reinterpret_cast<Vec*>(a.out), reinterpret_cast<Vec*>(a.residual), nvr}, &failed};
    for (int i = 0; i < n_mine; ++i)
      finish_rows<T, kBlockThreads, kLamportVecs, false, RowSync::kGroup>(src, sink, rows, row_begin(chunk_at(i)), row_end(chunk_at(i)), red);
    // finish_rows ends with a barrier: `failed` is final here
    if (failed != 0) {
      if (threadIdx.x == 0 && !aborted(c)) record_error(c, kErrTimeout, failed - 1, id.epoch, -1, id.sig, id.op, 0);
      ok = false;
    }
  }
  if (ok) {
    // Re-arm the buffer the previous Lamport call used (see the header comment for why it is quiet):
    // headers and the vectors it wrote, split evenly over this call's CTAs.
    char* old = c.ws[c.rank] + lamport_slot_off(l, stale, 0);
    const int64_t per_slot = 1 + int64_t(c.state->lamport_vecs[stale]);  // header + data
    const int64_t total = per_slot * W;
    const int64_t b0 = total * blockIdx.x / gridDim.x, b1 = total * (blockIdx.x + 1) / gridDim.x;
    const Vec sentinel{kLamportSentinelWord, kLamportSentinelWord, kLamportSentinelWord, kLamportSentinelWord};
    for (int64_t k = b0 + threadIdx.x; k < b1; k += kBlockThreads)
      *reinterpret_cast<Vec*>(old + (k / per_slot) * l.lamport_slot_bytes + (k % per_slot) * 16) = sentinel;
  } else {
    for (int i = 0; i < n_mine; ++i) poison_rows<T, kBlockThreads>(a.out, a.hidden, row_begin(chunk_at(i)), row_end(chunk_at(i)));
  }
  finish_call(c, id.epoch, /*lamport=*/true);
}

}  // namespace tokenweave
