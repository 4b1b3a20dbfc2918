// Lean two-shot: the TokenWeave order on p2p, with the finished rows written straight into every rank's
// destination. Its own kernel so that its register budget (W slot loads per vector) is not shared with the
// flagged algorithms (in one kernel, both spilled).
//
// Lean two-shot (kLean: out, and a replicated residual, are symmetric tensors), per chunk. Rows are owned
// in contiguous shards (rank q: rows [q * shard_rows, ...)); chunk c is rows [c * chunk_rows, ...) of every
// shard:
//   A  scatter : my copy of rank q's rows goes to rank q's slot (not my own rows: the owner reads x) (Tr::stage)
//   B  finish  : the owner sums its rows over ranks + residual, norms in registers and writes the results
//                straight into every rank's out (and residual)                          (Tr::store_all)
//   C  wait    : every owner's rows of chunk c have landed here
// Per byte of x (W = 4, sharded residual) 2.0 local reads, 0.5 local writes, 1.5 remote writes: 4.0,
// against 7.25 for the two-shot above (no staging of my own piece, no gather buffer read back and copied).
// Synchronisation is the flag protocol of allreduce.cuh (sync.cuh), with the same halves and parities.
// Every rank has entered the call before any owner writes into its out or residual: an owner writes only
// after the phase-A flags of every rank, and a rank raises its phase-A flag only from inside this call.
#pragma once

#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"
#include "tokenweave/transport.cuh"
#include "call.cuh"

namespace tokenweave {

// Vectors per thread of the owner's rows: W slot loads each, so fewer than the other epilogues keep
// (4 x 16 B x 512 threads = hidden 16384 for 2-byte types, 8192 for float32 in one pass of 512 threads).
constexpr int kLeanVecs = 4;

// Lean owner, rows are owner-local (0 = my first row): z = round_T(sum over ranks + residual).
template <typename T, int W, class Tr>
struct LeanSource {
  const CommDevice& c;
  int half;
  const Vec* x;         // all of x; my rows start at row_base
  const Vec* residual;  // nullptr: none; else indexed by owner-local row (sharded) or global row
  int64_t row_base;
  int64_t res_base;     // 0 (sharded residual) or row_base (replicated)
  int nvr;
  __device__ Vec load_z(int64_t lrow, int j) const {
    constexpr int L = Pack<T>::kLanes;
    const int64_t li = lrow * nvr + j;
    const Vec own = Tr::kStagesOwnPiece ? Vec{} : x[(row_base + lrow) * nvr + j];
    Vec r;
    if (residual) r = residual[(res_base + lrow) * nvr + j];
    float acc[L];
    Tr::reduce_own(c, half, uint64_t(li), own, acc);
    if (residual) add_vec<T>(acc, r);
    return Pack<T>::pack(acc);
  }
};

// Lean owner: the finished rows go to every rank's out, the residual to every rank (replicated) or
// only to my shard (sharded). The destination tables are held by value: their W addresses then live in
// registers. Held by reference (to the kernel parameter), every store first re-loaded its rank's address
// from a local-memory copy of the table, a load that missed L1 once the rows had streamed through it: the
// owner's phase took 72-79% of a CTA's cycles (bench/results/variants/def37c3/lean_phases-h200-tp4.json).
template <class Tr>
struct LeanSink {
  const CommDevice& c;
  PeerTable out;
  PeerTable res;         // used when res_all
  bool res_all;          // replicated residual: written on every rank
  Vec* res_shard;        // sharded residual: mine, indexed by owner-local row (nullptr: not sharded)
  int64_t row_base;
  int nvr;
  __device__ void store_res(int64_t lrow, int j, const Vec& v) const {
    if (res_shard) {
      res_shard[lrow * nvr + j] = v;
    } else if (res_all) {
      Tr::store_all(c, res, uint64_t((row_base + lrow) * nvr + j) * 16, v);
    }
  }
  __device__ void store_out(int64_t lrow, int j, const Vec& v) const {
    Tr::store_all(c, out, uint64_t((row_base + lrow) * nvr + j) * 16, v);
  }
};

template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads, 1) lean_kernel(const CommDevice c, const CallArgs a) {
  using Tr = TransportT<T, W>;
  constexpr int L = Pack<T>::kLanes;
  constexpr int kPhaseA = 0, kPhaseB = 1;
  __shared__ float red[2][kBlockThreads / 32];
  const CallId id = begin_call<T>(c, a);
  const int half = id.epoch & 1;
  const int nvr = a.hidden / L;
  const int n_mine = chunks_of_this_cta(a);
  const Vec* x = reinterpret_cast<const Vec*>(a.x);
  const Vec* residual = reinterpret_cast<const Vec*>(a.residual);
  const RowArgs rows = row_args(a);
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);
  if (ok) {
    // Chunk ch is owner-local rows [ch * chunk_rows, ...) of every shard; rank q owns n_rows(q) rows.
    const int64_t S = a.shard_rows;
    auto n_rows = [&](int q) { return max(int64_t(0), min(S, a.tokens - int64_t(q) * S)); };
    auto lrow_begin = [&](int q, int ch) { return min(int64_t(ch) * a.chunk_rows, n_rows(q)); };
    auto lrow_end = [&](int q, int ch) { return min(int64_t(ch + 1) * a.chunk_rows, n_rows(q)); };
    const bool sharded = (a.op & kOpShardedResidual) != 0;
    const bool has_res = (a.op & kOpResidual) != 0;
    const int64_t my_base = int64_t(c.rank) * S;
    const LeanSource<T, W, Tr> src{c, half, x, has_res ? residual : nullptr, my_base, sharded ? 0 : my_base, nvr};
    const LeanSink<Tr> sink{c, a.out_peers, a.res_peers, has_res && !sharded,
                            has_res && sharded ? reinterpret_cast<Vec*>(a.residual) : nullptr, my_base, nvr};
    PhaseTimers timers;
    timers.start();
    for (int step = 0; step <= n_mine + 1; ++step) {
      if (step < n_mine) {  // A: my copy of every owner's rows of this chunk into the owner's slot
        const int ch = chunk_at(step);
#pragma unroll
        for (int k = 1; k <= W; ++k) {
          const int q = (c.rank + k) % W;  // my own rows last, and only where the transport sums slots
          if (q == c.rank && !Tr::kStagesOwnPiece) continue;
          const int64_t base = (int64_t(q) * S) * nvr;
          stream_vecs(
              lrow_begin(q, ch) * nvr, lrow_end(q, ch) * nvr, [&](int64_t i) { return x[base + i]; },
              [&](int64_t i, const Vec& v) { Tr::stage(c, half, q, uint64_t(i), v); });
        }
        timers.tick(0);
        signal_all<Tr, W>(c, id, kPhaseA, ch);
        timers.tick(1);
      }
      if (step >= 1 && step - 1 < n_mine) {  // B: finish my rows of chunk step-1 and write them everywhere
        const int ch = chunk_at(step - 1);
        if (!(ok = wait_all<W>(c, id, kPhaseA, ch))) break;
        timers.tick(2);
        finish_rows<T, kBlockThreads, kLeanVecs, false, RowSync::kGroup>(src, sink, rows, lrow_begin(c.rank, ch), lrow_end(c.rank, ch), red);
        timers.tick(3);
        signal_all<Tr, W>(c, id, kPhaseB, ch);
        timers.tick(4);
      }
      if (step >= 2) {  // C: every owner's rows of chunk step-2 are in my out (and residual)
        if (!(ok = wait_all<W>(c, id, kPhaseB, chunk_at(step - 2)))) break;
        timers.tick(5);
      }
    }
    timers.report("lean", c.rank, int(gridDim.x));
  }

  if (!ok) {  // my out holds every row: poison the rows of my chunks in every shard
    for (int i = 0; i < n_mine; ++i)
      for (int q = 0; q < W; ++q) {
        const int64_t base = int64_t(q) * a.shard_rows, n = max(int64_t(0), min(a.shard_rows, a.tokens - base));
        const int ch = chunk_at(i);
        poison_rows<T, kBlockThreads>(a.out, a.hidden, base + min(int64_t(ch) * a.chunk_rows, n),
                                      base + min(int64_t(ch + 1) * a.chunk_rows, n));
      }
  }
  finish_call(c, id.epoch);
}

}  // namespace tokenweave
