// Pieces every collective kernel shares: streaming loops, the call header, the end-of-call epoch advance.
#pragma once

#ifdef TOKENWEAVE_PHASE_TIMERS
#include <cstdio>  // PhaseTimers::report
#endif

#include "tokenweave/common.cuh"
#include "tokenweave/pdl.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"

namespace tokenweave {

// How every collective kernel starts. PDL (pdl.cuh): before the wait only the norm weight's L2 prefetch, nothing
// the previous kernel in the stream may write; the epoch is read after it (the previous call advanced it).
template <typename T>
__device__ __forceinline__ CallId begin_call(const CommDevice& c, const CallArgs& a) {
  prefetch_l2((a.op & kOpNorm) ? a.weight : nullptr, int64_t(a.hidden) * int64_t(sizeof(T)));
  wait_for_prior_grid();
  return CallId{c.state->epoch + 1, a.sig, a.op};
}

// The row epilogue's arguments of a call (no weight: no norm, out = z).
__device__ __forceinline__ RowArgs row_args(const CallArgs& a) {
  return RowArgs{(a.op & kOpNorm) ? a.weight : nullptr, a.hidden, a.group, a.eps};
}

// Chunks this CTA owns: blockIdx.x, blockIdx.x + gridDim.x, ... below n_chunks.
__device__ __forceinline__ int chunks_of_this_cta(const CallArgs& a) {
  return (a.n_chunks - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
}

// Row ownership of the algorithms that shard x by rows (lean, lean_bulk, lamport_two_shot): rank q owns rows
// [q * S, q * S + n_rows(q)) (S = shard_rows); chunk ch is the owner-local rows [ch * chunk_rows, ...) of every shard.
struct ShardChunks {
  int64_t S, tokens, chunk_rows;
  __device__ int64_t n_rows(int q) const { return max(int64_t(0), min(S, tokens - int64_t(q) * S)); }
  __device__ int64_t begin(int q, int ch) const { return min(int64_t(ch) * chunk_rows, n_rows(q)); }
  __device__ int64_t end(int q, int ch) const { return min(int64_t(ch + 1) * chunk_rows, n_rows(q)); }
};

__device__ __forceinline__ ShardChunks shard_chunks(const CallArgs& a) {
  return ShardChunks{a.shard_rows, a.tokens, a.chunk_rows};
}

// A call that gave up: NaN into the rows of this CTA's chunks in every shard (my out holds every row).
template <typename T, int W>
__device__ void poison_shard_chunks(const CallArgs& a, int n_mine) {
  const ShardChunks sh = shard_chunks(a);
  for (int i = 0; i < n_mine; ++i) {
    const int ch = int(blockIdx.x) + i * int(gridDim.x);
    for (int q = 0; q < W; ++q)
      poison_rows<T, kBlockThreads>(a.out, a.hidden, q * sh.S + sh.begin(q, ch), q * sh.S + sh.end(q, ch));
  }
}

// Independent 16-byte vectors each thread keeps in flight in the streaming phases.
constexpr int kUnroll = 4;

// For i in [begin, end) spread over the CTA: v = load(i) for kUnroll indices, then store(i, v) for them,
// so the loads are in flight together (the compiler cannot reorder them across possibly-aliasing stores).
// (8 in flight was slower for the lean scatter: bench/results/variants/74363af/unroll4 vs main_unroll8.)
template <class Load, class Store>
__device__ __forceinline__ void stream_vecs(int64_t begin, int64_t end, const Load& load, const Store& store) {
  for (int64_t i = begin + threadIdx.x; i < end; i += int64_t(kUnroll) * kBlockThreads) {
    Vec v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = i + int64_t(u) * kBlockThreads;
      if (k < end) v[u] = load(k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = i + int64_t(u) * kBlockThreads;
      if (k < end) store(k, v[u]);
    }
  }
}

// Diagnostics of where a CTA's time goes, compiled in only with -DTOKENWEAVE_PHASE_TIMERS (never in a
// release build; bench/debug/lean_phases.py builds and runs it): thread 0 of each CTA adds the cycles since
// its previous tick to phase k; thread 0 of CTA 0 prints the totals when the call ends.
struct PhaseTimers {
#ifdef TOKENWEAVE_PHASE_TIMERS
  unsigned long long cycles[6] = {};
  unsigned long long last = 0;
  __device__ void start() { last = clock64(); }
  __device__ void tick(int k) {
    if (threadIdx.x != 0) return;
    const unsigned long long now = clock64();
    cycles[k] += now - last;
    last = now;
  }
  __device__ void report(const char* kernel, int rank, int ctas) const {
    if (threadIdx.x == 0 && blockIdx.x == 0)
      printf("phase_timers %s rank %d ctas %d cycles: stream %llu signal_a %llu wait_a %llu finish %llu signal_b %llu "
             "wait_b %llu\n", kernel, rank, ctas, cycles[0], cycles[1], cycles[2], cycles[3], cycles[4], cycles[5]);
  }
#else
  __device__ void start() {}
  __device__ void tick(int) {}
  __device__ void report(const char*, int, int) const {}
#endif
};

// Diagnostics: tell every rank what this rank is calling (Python decodes it on a mismatch). The first
// flag release (barrier + fence) orders it; Lamport calls have no flag and publish it best-effort.
__device__ __forceinline__ void publish_call_header(const CommDevice& c, const CallArgs& a, uint32_t epoch, int W) {
  if (blockIdx.x == 0 && threadIdx.x < W) {
    CallHeader h{};
    h.sig = a.sig;
    h.epoch = epoch;
    h.op = a.op;
    h.dtype = a.dtype;
    h.tokens = a.tokens;
    h.hidden = a.hidden;
    h.ctas = a.ctas;
    h.chunk_rows = a.chunk_rows;
    h.algo = a.algo;
    reinterpret_cast<CallHeader*>(c.ws[threadIdx.x] + c.layout.headers_off)[(epoch & 1) * kMaxWorld + c.rank] = h;
  }
}

// The last CTA to finish advances the epoch (and the Lamport sequence, for Lamport calls); every CTA
// read them at its start, before taking a ticket.
__device__ __forceinline__ void finish_call(const CommDevice& c, uint32_t epoch, bool lamport = false) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&c.state->ticket, 1u) == gridDim.x - 1) {
    c.state->ticket = 0;
    if (lamport) c.state->lamport_seq += 1;
    c.state->epoch = epoch;
  }
}

}  // namespace tokenweave
