// Pieces every collective kernel shares: streaming loops, the call header, the end-of-call epoch advance.
#pragma once

#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"

namespace tokenweave {

// Independent 16-byte vectors each thread keeps in flight in the streaming phases.
constexpr int kUnroll = 4;

// For i in [begin, end) spread over the CTA: v = load(i) for kUnroll indices, then store(i, v) for them,
// so the loads are in flight together (the compiler cannot reorder them across possibly-aliasing stores).
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
