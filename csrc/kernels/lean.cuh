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
//
// Lean pull (kLeanPull: x is a symmetric tensor too): no scatter. Phase A moves nothing; its flag says "I am
// in this call" (my x is complete, my out writable), and the owner reads its rows of every rank's x where they
// lie. Per byte of x (W = 4, sharded residual) 0.5 local reads, 0.75 remote reads, 0.5 local writes, 0.75
// remote writes: 2.5. A rank's x may change again only after its call returns, i.e. after phase C: every owner
// raised its phase-B flag (a release, after its reads of my x) for each of my chunks.
#pragma once

#include "tokenweave/bulk.cuh"
#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"
#include "tokenweave/transport.cuh"
#include "call.cuh"

namespace tokenweave {

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

// Lean pull owner: z = round_T(sum over every rank's x at my rows + residual), each x read where it lies. The
// table is held by value (its W addresses in registers), as LeanSink's are.
template <typename T, class Tr>
struct LeanPullSource {
  PeerTable x;
  const Vec* residual;  // as LeanSource's
  int64_t row_base;
  int64_t res_base;
  int nvr;
  __device__ Vec load_z(int64_t lrow, int j) const {
    Vec r;
    if (residual) r = residual[(res_base + lrow) * nvr + j];
    float acc[Pack<T>::kLanes];
    Tr::reduce_all(x, uint64_t((row_base + lrow) * nvr + j) * 16, acc);
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

// The owner's source and sink of a lean call (kernel arguments -> policies).
template <typename T, int W, class Tr>
__device__ __forceinline__ LeanSource<T, W, Tr> lean_source(const CommDevice& c, const CallArgs& a, int half) {
  const bool sharded = (a.op & kOpShardedResidual) != 0;
  const int64_t my_base = int64_t(c.rank) * a.shard_rows;
  return LeanSource<T, W, Tr>{c, half, reinterpret_cast<const Vec*>(a.x),
                              (a.op & kOpResidual) ? reinterpret_cast<const Vec*>(a.residual) : nullptr, my_base,
                              sharded ? 0 : my_base, a.hidden / Pack<T>::kLanes};
}

template <typename T, class Tr>
__device__ __forceinline__ LeanPullSource<T, Tr> lean_pull_source(const CommDevice& c, const CallArgs& a) {
  const bool sharded = (a.op & kOpShardedResidual) != 0;
  const int64_t my_base = int64_t(c.rank) * a.shard_rows;
  return LeanPullSource<T, Tr>{a.x_peers, (a.op & kOpResidual) ? reinterpret_cast<const Vec*>(a.residual) : nullptr,
                               my_base, sharded ? 0 : my_base, a.hidden / Pack<T>::kLanes};
}

template <typename T, class Tr>
__device__ __forceinline__ LeanSink<Tr> lean_sink(const CommDevice& c, const CallArgs& a) {
  const bool sharded = (a.op & kOpShardedResidual) != 0, has_res = (a.op & kOpResidual) != 0;
  return LeanSink<Tr>{c, a.out_peers, a.res_peers, has_res && !sharded,
                      has_res && sharded ? reinterpret_cast<Vec*>(a.residual) : nullptr,
                      int64_t(c.rank) * a.shard_rows, a.hidden / Pack<T>::kLanes};
}

// The body of lean_kernel (kPull = false) and lean_pull_kernel (kPull = true).
template <typename T, int W, class Tr, bool kPull>
__device__ __forceinline__ void run_lean(const CommDevice& c, const CallArgs& a) {
  constexpr int L = Pack<T>::kLanes;
  constexpr int kPhaseA = 0, kPhaseB = 1;
  __shared__ float red[2][kBlockThreads / 32];
  const CallId id = begin_call<T>(c, a);
  const int half = id.epoch & 1;
  const int nvr = a.hidden / L;
  const int n_mine = chunks_of_this_cta(a);
  const Vec* x = reinterpret_cast<const Vec*>(a.x);
  const RowArgs rows = row_args(a);
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);
  if (ok) {
    const ShardChunks sh = shard_chunks(a);
    const int64_t S = sh.S;
    auto lrow_begin = [&](int q, int ch) { return sh.begin(q, ch); };
    auto lrow_end = [&](int q, int ch) { return sh.end(q, ch); };
    const auto src = [&] {
      if constexpr (kPull) return lean_pull_source<T, Tr>(c, a);
      else return lean_source<T, W, Tr>(c, a, half);
    }();
    const LeanSink<Tr> sink = lean_sink<T, Tr>(c, a);
    PhaseTimers timers;
    timers.start();
    for (int step = 0; step <= n_mine + 1; ++step) {
      if (step < n_mine) {  // A: my copy of every owner's rows of this chunk into the owner's slot (pull: none)
        const int ch = chunk_at(step);
        if constexpr (!kPull) {
#pragma unroll
          for (int k = 1; k <= W; ++k) {
            const int q = (c.rank + k) % W;  // my own rows last, and only where the transport sums slots
            if (q == c.rank && !Tr::kStagesOwnPiece) continue;
            const int64_t base = (int64_t(q) * S) * nvr;
            stream_vecs(
                lrow_begin(q, ch) * nvr, lrow_end(q, ch) * nvr, [&](int64_t i) { return x[base + i]; },
                [&](int64_t i, const Vec& v) { Tr::stage(c, half, q, uint64_t(i), v); });
          }
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
    timers.report(kPull ? "lean_pull" : "lean", c.rank, int(gridDim.x));
  }

  if (!ok) poison_shard_chunks<T, W>(a, n_mine);
  finish_call(c, id.epoch);
}

template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads, 1) lean_kernel(const CommDevice c, const CallArgs a) {
  run_lean<T, W, TransportT<T, W>, false>(c, a);
}

template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads, 1) lean_pull_kernel(const CommDevice c, const CallArgs a) {
  run_lean<T, W, TransportT<T, W>, true>(c, a);
}

// lean_bulk: lean with its scatter (phase A) moved to a copy warp beside the kBlockThreads workers. Thread 0
// of that warp streams each chunk's pieces through a ring of shared-memory stages with bulk copies (bulk.cuh:
// x -> stage -> the owner's slot, kBulkStages - 1 loads ahead of the stores) and, once a chunk's stores are
// complete, releases its phase-A flags itself. The workers only finish rows: wait for a chunk's phase-A
// flags, sum + norm in registers, push to every rank, release phase B. So the scatter of later chunks
// overlaps the finish of earlier ones on every CTA count, and no worker ever waits on the scatter's
// system-scope fence. The workers' barriers are named (data_sync<true>): the copy warp joins none of them.
// 4 x 32 KiB stages: ~96 KiB of loads in flight per CTA, what ~1 us of memory latency needs for ~100 GB/s.
constexpr int kBulkStages = 4;
constexpr uint32_t kBulkStageBytes = 32u << 10;
constexpr int kCopyWarpThreads = 32;
constexpr size_t kBulkRingBytes = size_t(kBulkStages) * kBulkStageBytes;
static_assert(kBulkStageBytes % 16 == 0, "bulk copies move multiples of 16 bytes");

// The copy warp's thread: phase A of this CTA's chunks. Returns false after recording why it gave up (its
// own copies timed out, or another CTA of this rank failed); every copy it issued has completed by then.
template <class Tr, int W>
__device__ bool scatter_by_bulk_copies(const CommDevice& c, const CallArgs& a, const CallId& id, int half, int n_mine,
                                       char* ring, uint64_t* full) {
  constexpr int kPhaseA = 0;
  const ShardChunks sh = shard_chunks(a);
  const int64_t row_bytes = int64_t(a.hidden) * (a.dtype == int(DType::kFloat32) ? 4 : 2);
  const char* x = static_cast<const char*>(a.x);
  for (int s = 0; s < kBulkStages; ++s) mbar_init(&full[s], 1);
  fence_mbar_init();
  fence_proxy_async_global();  // x, written by the generic proxy before this call, read by the async proxy
  uint32_t loaded = 0, stored = 0;  // pieces over the whole call: stage p % kBulkStages, parity (p / kBulkStages) & 1
  bool ok = true;
  int ch = -1;
  auto wait_loaded = [&](uint32_t p, bool give_up_on_abort) {
    const uint64_t start = globaltimer_ns();
    for (uint32_t spin = 0;; ++spin) {
      if (mbar_try_wait(&full[p % kBulkStages], (p / kBulkStages) & 1)) return true;
      if ((spin & 63) == 63) {
        if (give_up_on_abort && aborted(c)) return false;
        if (globaltimer_ns() - start > c.timeout_ns) {  // a local copy that never completes: report, give up
          record_error(c, kErrTimeout, c.rank, id.epoch, ch, id.sig, id.op, 0);
          return false;
        }
      }
    }
  };
  for (int i = 0; ok && i < n_mine; ++i) {
    ch = int(blockIdx.x) + i * int(gridDim.x);
    // The chunk's pieces in order: owners q = rank + 1, rank + 2, ... (my own rows last, and only where the
    // transport sums slots: p2p owners read their own rows from x), each owner's rows split into stages.
    struct Cursor {
      int k = 1;
      int64_t off = 0;
    } ld, st;
    auto next = [&](Cursor& cur, const char*& src, char*& dst, uint32_t& n) {
      for (; cur.k <= W; ++cur.k, cur.off = 0) {
        const int q = (c.rank + cur.k) % W;
        if (q == c.rank && !Tr::kStagesOwnPiece) continue;
        const int64_t r0 = sh.begin(q, ch), bytes = (sh.end(q, ch) - r0) * row_bytes;
        if (cur.off >= bytes) continue;
        n = uint32_t(min(int64_t(kBulkStageBytes), bytes - cur.off));
        src = x + (int64_t(q) * sh.S + r0) * row_bytes + cur.off;
        dst = Tr::stage_ptr(c, half, q) + r0 * row_bytes + cur.off;
        cur.off += n;
        return true;
      }
      return false;
    };
    const char* src;
    char* dst;
    uint32_t n;
    auto load_next = [&] {
      if (!next(ld, src, dst, n)) return false;
      char* stage = ring + size_t(loaded % kBulkStages) * kBulkStageBytes;
      mbar_expect_tx(&full[loaded % kBulkStages], n);
      bulk_load(stage, src, n, &full[loaded % kBulkStages]);
      ++loaded;
      return true;
    };
    while (loaded - stored < kBulkStages - 1 && load_next()) {
    }
    while (stored < loaded) {
      if (!(ok = wait_loaded(stored, true))) break;
      next(st, src, dst, n);
      bulk_store(dst, ring + size_t(stored % kBulkStages) * kBulkStageBytes, n);
      bulk_commit();
      ++stored;
      // The next load reuses the stage of piece loaded - kBulkStages <= stored - 2: all but the newest store
      // group must have read their stages.
      bulk_wait_read<1>();
      load_next();
    }
    bulk_wait_all();
    if (ok) {
      fence_proxy_async_global();  // the bulk stores before the flag release (bulk.cuh)
      Tr::fence_before_signal();
      post_flags<W>(c, id, kPhaseA, ch);
    }
  }
  for (uint32_t p = stored; p < loaded; ++p) wait_loaded(p, false);  // never leave a copy into a stage in flight
  return ok;
}

template <typename T, int W, template <typename, int> class TransportT>
__global__ void __launch_bounds__(kBlockThreads + kCopyWarpThreads, 1) lean_bulk_kernel(const CommDevice c,
                                                                                          const CallArgs a) {
  using Tr = TransportT<T, W>;
  constexpr int kPhaseA = 0, kPhaseB = 1;
  __shared__ float red[2][kBlockThreads / 32];
  __shared__ uint64_t full[kBulkStages];
  extern __shared__ __align__(128) char ring[];
  const CallId id = begin_call<T>(c, a);
  const int half = id.epoch & 1;
  const int n_mine = chunks_of_this_cta(a);
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };

  bool ok = !aborted(c);
  if (threadIdx.x >= kBlockThreads) {  // the copy warp
    if (ok && threadIdx.x == kBlockThreads) scatter_by_bulk_copies<Tr, W>(c, a, id, half, n_mine, ring, full);
    __syncwarp();
  } else {
    if (ok) publish_call_header(c, a, id.epoch, W);
    const ShardChunks sh = shard_chunks(a);
    const LeanSource<T, W, Tr> src = lean_source<T, W, Tr>(c, a, half);
    const LeanSink<Tr> sink = lean_sink<T, Tr>(c, a);
    const RowArgs rows = row_args(a);
    for (int i = 0; ok && i < n_mine; ++i) {  // B: finish my rows of each chunk once every rank staged them
      const int ch = chunk_at(i);
      if (!(ok = wait_all<W, true>(c, id, kPhaseA, ch))) break;
      finish_rows<T, kBlockThreads, kLeanVecs, false, RowSync::kGroupOfWorkers>(src, sink, rows, sh.begin(c.rank, ch),
                                                                                sh.end(c.rank, ch), red);
      signal_all<Tr, W, true>(c, id, kPhaseB, ch);
    }
    for (int i = 0; ok && i < n_mine; ++i) ok = wait_all<W, true>(c, id, kPhaseB, chunk_at(i));  // C: all rows landed
    if (!ok) poison_shard_chunks<T, W>(a, n_mine);
  }
  finish_call(c, id.epoch);
}

}  // namespace tokenweave
