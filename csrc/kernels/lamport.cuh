// Lamport one-shot: a one-shot all-reduce (+ residual + RMSNorm) with no flags and no fences.
//
// The data is its own flag. Every Lamport buffer starts filled with the sentinel -0.0 in every 2-byte lane
// (0x8000); writers turn a real -0.0 into +0.0, so a lane holding the sentinel has not arrived yet.
// Per call, each rank pushes its (canonicalised) rows of x into its slot of every rank's buffer, then polls
// its own buffer until no lane of the rows it finishes holds the sentinel, sums the W slots in rank order
// (+ residual), and runs the row epilogue: one NVLink crossing and no system-scope fence on the path.
//
// Three buffers rotate by the Lamport sequence k (Lamport calls only, one-shot and two-shot alike: both
// count, so a buffer always belongs to one call of either kind): call k writes buffer k % 3 and
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
//
// Lamport two-shot (lamport_two_shot_kernel below): the same, with two crossings, for the mid range where a
// one-shot pushes too many bytes ((W - 1) copies of x) and the flagged two-shot pays a flag crossing per phase.
// Rows are owned in contiguous shards as in lean.cuh (rank q: [q * shard_rows, ...)); chunk ch is owner-local
// rows [ch * chunk_rows, ...) of every shard. Each buffer has two regions of W slots (types.h):
//   S  scatter: my copy of rank q's rows of my chunks (canonicalised) -> q's buffer, region S, slot <me>
//   owner     : headers checked (as above); z = round_T(sum over ranks in rank order of the polled S slots, my
//               own x for my slot, + residual), canonicalised -> region G, slot <me>, of EVERY rank (me too);
//               a sharded residual (kOpShardedResidual) takes z here, in the owner's shard
//   G  epilogue: every rank polls G slot q for the rows of shard q of its chunks: that is z; residual <- z
//               (replicated), out <- RMSNorm(z) * weight, the same code on the same bits on every rank.
// Every element is summed once, by its owner, in rank order: bitwise identical on every rank, and the same
// values as the flagged two-shot; bits may differ only in the sign of an exact zero, because z is canonicalised
// before it crosses (a z of -0.0, e.g. a tiny negative sum rounded to T, arrives as +0.0 on every rank).
// Why re-filling buffer (k + 2) % 3 in call k is quiet with two crossings: (1) every store into my buffer in call
// k - 1 was consumed by me in call k - 1: region S slot s holds only my own rows from rank s, all of which my
// owner phase polled; region G slot q holds shard q, all of which my epilogue polled (every chunk has a CTA);
// so all of call k - 1's stores had landed before call k began. (2) A peer writes buffer (k + 2) % 3 next in its
// call k + 2, and every CTA of it waits in its call k + 1 for my call k + 1 region-S header, which I write only
// after this call (clearing stores included) completed (stream order). The header wait alone carries it, even
// where my shard or the peer's is empty (no data crosses between us then).
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

// Slot `src` of region `region` of Lamport buffer `buf` (types.h: [3 buffers][2 regions][world slots]).
__device__ __forceinline__ uint64_t lamport_slot_off(const Layout& l, int buf, int region, int src) {
  return l.lamport_off + ((uint64_t(buf) * kLamportRegions + region) * l.world + src) * l.lamport_slot_bytes;
}

// Re-reads *p until no lane of v (its first read) holds the sentinel. Bounded: every 64 polls it gives up once
// another thread of the CTA or another CTA of this rank failed, or past `deadline` (globaltimer ns), and marks
// `failed` (shared: peer + 1); what it returns then must not be used (callers check `failed`).
__device__ __forceinline__ Vec poll_lamport(const Vec* p, Vec v, int peer, uint64_t deadline, const CommDevice& c,
                                            int* failed) {
  for (uint32_t spin = 1; has_sentinel(v); ++spin) {
    if ((spin & 63) == 0 &&
        (*reinterpret_cast<volatile int*>(failed) != 0 || aborted(c) || globaltimer_ns() > deadline)) {
      atomicCAS(failed, 0, peer + 1);
      break;
    }
    v = ld_volatile(p);
  }
  return v;
}

// z from the W slots of this call's buffer (region S): each vector is polled until no lane holds the sentinel
// (my own part is read from x, canonicalised the same way), then summed in rank order + residual. Polls are
// bounded (poll_lamport); after one gave up the caller records the error and poisons the rows.
// Vector idx of x, the residual and every slot: the one-shot indexes all rows, the two-shot's owner its own rows
// (x and residual then point at its first row).
template <typename T, int W>
struct LamportSource {
  const char* slots;  // my buffer's region S, slot 0's header
  uint64_t slot_bytes;
  const Vec* x;
  const Vec* residual;
  int nvr;
  int rank;
  uint64_t deadline;  // globaltimer ns
  const CommDevice* c;
  int* failed;        // shared memory
  __device__ const Vec* slot(int s, int64_t idx) const {
    return reinterpret_cast<const Vec*>(slots + s * slot_bytes + 16) + idx;
  }
  __device__ Vec load_vec(int64_t idx) const {
    constexpr int L = Pack<T>::kLanes;
    Vec v[W];
#pragma unroll
    for (int s = 0; s < W; ++s) v[s] = s == rank ? canonicalise(x[idx]) : ld_volatile(slot(s, idx));
    Vec r;
    if (residual) r = residual[idx];
#pragma unroll
    for (int s = 0; s < W; ++s)
      if (s != rank) v[s] = poll_lamport(slot(s, idx), v[s], s, deadline, *c, failed);
    float acc[L];
    sum_in_rank_order<T, W>(v, acc);
    if (residual) add_vec<T>(acc, r);
    return Pack<T>::pack(acc);
  }
  __device__ Vec load_z(int64_t row, int j) const { return load_vec(row * nvr + j); }
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

// Every peer's slot header in `slots` (my buffer's region S; threads 0..W-1): a peer making another call is a
// mismatch before any of its data is read. Bounded like the polls. Returns, for the whole CTA, whether every
// header arrived and matched (errors are recorded here).
template <int W>
__device__ __forceinline__ bool lamport_headers_match(const CommDevice& c, const CallId& id, const char* slots,
                                                      uint32_t seq, uint64_t start, bool ok) {
  if (ok && threadIdx.x < W && threadIdx.x != c.rank) {
    const int s = threadIdx.x;
    const Vec* hp = reinterpret_cast<const Vec*>(slots + uint64_t(s) * c.layout.lamport_slot_bytes);
    Vec h = ld_volatile(hp);
    for (uint32_t spin = 1; ok && has_sentinel(h); ++spin) {
      if ((spin & 63) == 0 && (aborted(c) || globaltimer_ns() - start > c.timeout_ns)) {
        if (!aborted(c)) record_error(c, kErrTimeout, s, id.epoch, -1, id.sig, id.op, 0);
        ok = false;
      }
      h = ld_volatile(hp);
    }
    const Vec want = lamport_header(id.sig, seq);
    if (ok && (h.x != want.x || h.y != want.y || h.z != want.z || h.w != want.w)) {
      uint32_t peer_sig = 0;
      const uint32_t hw[2] = {h.x, h.y};
      for (int i = 0; i < 4; ++i) peer_sig |= ((hw[i / 2] >> (16 * (i % 2))) & 0xffu) << (8 * i);
      record_error(c, kErrMismatch, s, id.epoch, -1, id.sig, id.op, uint64_t(peer_sig) << 32);
      ok = false;
    }
  }
  return __syncthreads_and(ok) != 0;
}

// After a CTA's polls (the finish_rows loop ends with a barrier, so `failed` is final): whether none gave up; the
// first that did is recorded as a timeout waiting for its peer.
__device__ __forceinline__ bool lamport_polls_ok(const CommDevice& c, const CallId& id, int failed) {
  if (failed == 0) return true;
  if (threadIdx.x == 0 && !aborted(c)) record_error(c, kErrTimeout, failed - 1, id.epoch, -1, id.sig, id.op, 0);
  return false;
}

// Re-arms buffer `stale`, which the previous Lamport call used (see the header comments for why it is quiet):
// the headers and vectors that call wrote (c.state->lamport_vecs), in region S and, after a two-shot, region G,
// split evenly over this call's CTAs.
__device__ __forceinline__ void rearm_lamport_buffer(const CommDevice& c, int stale) {
  const Layout& l = c.layout;
  const uint32_t used = c.state->lamport_vecs[stale];
  char* base = c.ws[c.rank] + lamport_slot_off(l, stale, kLamportRegionS, 0);  // region G's slots follow S's
  const int64_t per_slot = 1 + int64_t(used & ~kLamportUsedG);                  // header + data
  const int64_t total = per_slot * l.world * ((used & kLamportUsedG) ? kLamportRegions : 1);
  const int64_t b0 = total * blockIdx.x / gridDim.x, b1 = total * (blockIdx.x + 1) / gridDim.x;
  const Vec sentinel{kLamportSentinelWord, kLamportSentinelWord, kLamportSentinelWord, kLamportSentinelWord};
  for (int64_t k = b0 + threadIdx.x; k < b1; k += kBlockThreads)
    *reinterpret_cast<Vec*>(base + (k / per_slot) * l.lamport_slot_bytes + (k % per_slot) * 16) = sentinel;
}

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
  char* mine = c.ws[c.rank] + lamport_slot_off(l, buf, kLamportRegionS, 0);  // my buffer: W slots, header + data

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);
  if (blockIdx.x == 0 && threadIdx.x == 0) c.state->lamport_vecs[buf] = uint32_t(n_vecs);  // for call k + 1

  if (ok) {  // push: header (CTA 0) and my chunks' rows into my slot of every rank's buffer
    const uint64_t my_slot = lamport_slot_off(l, buf, kLamportRegionS, c.rank);
    if (blockIdx.x == 0 && threadIdx.x == 0) Tr::broadcast(c, my_slot, lamport_header(a.sig, seq));
    for (int i = 0; i < n_mine; ++i) {
      const int ch = chunk_at(i);
      stream_vecs(
          row_begin(ch) * nvr, row_end(ch) * nvr, [&](int64_t k) { return canonicalise(x[k]); },
          [&](int64_t k, const Vec& v) { Tr::broadcast(c, my_slot + 16 + uint64_t(k) * 16, v); });
    }
    Tr::fence_before_signal();  // multimem: order the multicast stores before peers' unicast reads
  }

  // Every peer's header first: a peer making another call is a mismatch before any data is read.
  const uint64_t start = globaltimer_ns();
  __shared__ int failed;  // peer + 1 of the first poll of this CTA that gave up
  if (threadIdx.x == 0) failed = 0;
  ok = lamport_headers_match<W>(c, id, mine, seq, start, ok);

  if (ok) {  // the data: polled vector by vector inside the row epilogue (one pass over the slots)
    const RowArgs rows = row_args(a);
    const LamportSource<T, W> src{mine, l.lamport_slot_bytes, x,
                                  (a.op & kOpResidual) ? reinterpret_cast<const Vec*>(a.residual) : nullptr, nvr,
                                  c.rank, start + c.timeout_ns, &c, &failed};
    const LamportSink sink{LocalSink{reinterpret_cast<Vec*>(a.out), reinterpret_cast<Vec*>(a.residual), nvr}, &failed};
    for (int i = 0; i < n_mine; ++i)
      finish_rows<T, kBlockThreads, kLamportVecs, false, RowSync::kGroup>(src, sink, rows, row_begin(chunk_at(i)), row_end(chunk_at(i)), red);
    ok = lamport_polls_ok(c, id, failed);
  }
  if (ok) {
    rearm_lamport_buffer(c, stale);
  } else {
    for (int i = 0; i < n_mine; ++i) poison_rows<T, kBlockThreads>(a.out, a.hidden, row_begin(chunk_at(i)), row_end(chunk_at(i)));
  }
  finish_call(c, id.epoch, /*lamport=*/true);
}

// Lamport two-shot's epilogue: z of shard `owner`'s rows, polled from my buffer's region G slot <owner>
// (owner-local vectors; rows are global). Bounded like every poll (poll_lamport).
struct LamportGatherSource {
  const Vec* slot;   // region G, slot <owner>: its rows' z, owner-local
  int64_t row_base;  // the shard's first global row
  int nvr;
  int owner;
  uint64_t deadline;
  const CommDevice* c;
  int* failed;
  __device__ Vec load_z(int64_t row, int j) const {
    const Vec* p = slot + (row - row_base) * nvr + j;
    return poll_lamport(p, ld_volatile(p), owner, deadline, *c, failed);
  }
};

// The Lamport two-shot (header comment): scatter, owner, epilogue; no flags, no fences on the data path.
template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads, 1) lamport_two_shot_kernel(const CommDevice c, const CallArgs a) {
  using Tr = TransportT<T, W>;
  constexpr int L = Pack<T>::kLanes;
  __shared__ float red[2][kBlockThreads / 32];
  __shared__ int failed;  // peer + 1 of the first poll of this CTA that gave up
  const Layout& l = c.layout;
  const CallId id = begin_call<T>(c, a);
  const uint32_t seq = c.state->lamport_seq + 1;
  const int buf = int(seq % 3), stale = int((seq + 2) % 3);
  const int nvr = a.hidden / L;
  const ShardChunks sh = shard_chunks(a);
  const int64_t S = sh.S;
  const int n_mine = chunks_of_this_cta(a);
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };
  auto lrow_begin = [&](int q, int ch) { return sh.begin(q, ch); };
  auto lrow_end = [&](int q, int ch) { return sh.end(q, ch); };
  const Vec* x = reinterpret_cast<const Vec*>(a.x);
  Vec* residual = reinterpret_cast<Vec*>(a.residual);
  const bool has_res = (a.op & kOpResidual) != 0, sharded = (a.op & kOpShardedResidual) != 0;
  const uint64_t s_off = lamport_slot_off(l, buf, kLamportRegionS, 0), g_off = lamport_slot_off(l, buf, kLamportRegionG, 0);
  const uint64_t my_s_slot = s_off + uint64_t(c.rank) * l.lamport_slot_bytes;
  const uint64_t my_g_data = g_off + uint64_t(c.rank) * l.lamport_slot_bytes + 16;

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);
  // For call k + 1's re-arm: at most shard_rows rows per slot, in both regions.
  if (blockIdx.x == 0 && threadIdx.x == 0) c.state->lamport_vecs[buf] = uint32_t(S * nvr) | kLamportUsedG;

  if (ok) {  // S: header (CTA 0) into my slot of every rank; my copy of each peer's rows of my chunks into its slot
    if (blockIdx.x == 0 && threadIdx.x == 0) Tr::broadcast(c, my_s_slot, lamport_header(a.sig, seq));
    for (int i = 0; i < n_mine; ++i) {
      const int ch = chunk_at(i);
#pragma unroll
      for (int k = 1; k < W; ++k) {  // peers only: the owner reads its own rows from x
        const int q = (c.rank + k) % W;
        const Vec* xq = x + int64_t(q) * S * nvr;
        Vec* dst = reinterpret_cast<Vec*>(c.ws[q] + my_s_slot + 16);  // unicast on either transport: one owner
        stream_vecs(
            lrow_begin(q, ch) * nvr, lrow_end(q, ch) * nvr, [&](int64_t v) { return canonicalise(xq[v]); },
            [&](int64_t v, const Vec& val) { dst[v] = val; });
      }
    }
    Tr::fence_before_signal();  // multimem: the header went through the multicast alias
  }

  const uint64_t start = globaltimer_ns();
  if (threadIdx.x == 0) failed = 0;
  ok = lamport_headers_match<W>(c, id, c.ws[c.rank] + s_off, seq, start, ok);

  if (ok) {  // owner: my rows of my chunks, summed over the polled S slots, pushed into every rank's region G
    const int64_t my_base = int64_t(c.rank) * S;
    const LamportSource<T, W> src{c.ws[c.rank] + s_off, l.lamport_slot_bytes, x + my_base * nvr,
                                  has_res ? residual + (sharded ? 0 : my_base * nvr) : nullptr, nvr, c.rank,
                                  start + c.timeout_ns, &c, &failed};
    Vec* res_shard = has_res && sharded ? residual : nullptr;  // owner-local rows
    for (int i = 0; i < n_mine; ++i) {
      const int ch = chunk_at(i);
      stream_vecs(
          lrow_begin(c.rank, ch) * nvr, lrow_end(c.rank, ch) * nvr, [&](int64_t v) { return canonicalise(src.load_vec(v)); },
          [&](int64_t v, const Vec& z) {
            // A sum built on a poll that gave up never leaves this rank: its readers time out instead.
            if (*reinterpret_cast<volatile int*>(&failed) != 0) return;
            if (res_shard) res_shard[v] = z;
            Tr::broadcast(c, my_g_data + uint64_t(v) * 16, z);
          });
    }
    Tr::fence_before_signal();  // multimem: order the multicast stores before peers' unicast reads
    // Uniform over the CTA; the barrier also orders this phase's reads of the replicated residual before the
    // epilogue's writes of the same rows (by other threads).
    ok = __syncthreads_and(failed == 0) != 0;
  }
  if (ok) {  // G: every shard's rows of my chunks, polled from region G, then the row epilogue
    const RowArgs rows = row_args(a);
    const LamportSink sink{LocalSink{reinterpret_cast<Vec*>(a.out), has_res && !sharded ? residual : nullptr, nvr},
                           &failed};
    for (int i = 0; i < n_mine; ++i) {
      const int ch = chunk_at(i);
      for (int k = 0; k < W; ++k) {  // my own shard first: its z is already here
        const int q = (c.rank + k) % W;
        const int64_t base = int64_t(q) * S;
        const LamportGatherSource src{
            reinterpret_cast<const Vec*>(c.ws[c.rank] + g_off + uint64_t(q) * l.lamport_slot_bytes + 16), base, nvr, q,
            start + c.timeout_ns, &c, &failed};
        finish_rows<T, kBlockThreads, kLamportVecs, false, RowSync::kGroup>(src, sink, rows, base + lrow_begin(q, ch),
                                                                            base + lrow_end(q, ch), red);
      }
    }
  }
  ok = lamport_polls_ok(c, id, failed) && ok;
  if (ok) {
    rearm_lamport_buffer(c, stale);
  } else {
    poison_shard_chunks<T, W>(a, n_mine);
  }
  finish_call(c, id.epoch, /*lamport=*/true);
}

}  // namespace tokenweave
