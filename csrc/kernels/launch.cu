// Torch-free launchers: planning, transport dispatch, the standalone add + RMSNorm, the peer probe.
#include <atomic>

#include <cstdio>

#include "tokenweave/bulk.cuh"
#include "tokenweave/pdl.cuh"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"  // globaltimer_ns
#include "tokenweave/tokenweave.h"

namespace tokenweave {

namespace {
std::atomic<bool> g_programmatic_launch{false};
}  // namespace

void set_programmatic_launch(bool on) { g_programmatic_launch.store(on, std::memory_order_relaxed); }
bool programmatic_launch() { return g_programmatic_launch.load(std::memory_order_relaxed); }

cudaError_t launch_allreduce_p2p(const CommDevice& c, const CallArgs& a, cudaStream_t s);
cudaError_t launch_allreduce_multimem(const CommDevice& c, const CallArgs& a, cudaStream_t s);

const char* plan_allreduce(CallArgs& a, const Layout& l, int ctas, int chunks_per_cta, int chunk_rows) {
  const int lanes = lanes_of(DType(a.dtype));
  const uint64_t elem = 16 / lanes;
  if (a.tokens < 1) return "tokens must be >= 1";
  if (a.hidden % 8 != 0) return "hidden must be a multiple of 8 (16-byte vectors)";
  a.group = plan_row_group(a.hidden, lanes);
  if (a.group < 0) return "hidden is too large for the row epilogue (at most 32768 for 2-byte types, 16384 for float32)";
  if (ctas < 1 || chunks_per_cta < 1) return "ctas and chunks_per_cta must be >= 1";
  const uint64_t bytes = uint64_t(a.tokens) * a.hidden * elem;
  const uint64_t nvr = a.hidden / lanes;
  if (bytes > l.capacity_bytes) return "x is larger than the workspace: make the Communicator with a larger max_tokens";
  const Algo algo = Algo(a.algo);
  const bool lean = algo == Algo::kLean || algo == Algo::kLeanBulk || algo == Algo::kLeanPull;
  if (algo != Algo::kOneShot && algo != Algo::kTwoShot && algo != Algo::kLamport && !lean &&
      algo != Algo::kLamportTwoShot)
    return "algo must be one_shot, two_shot, lamport, lean, lean_bulk, lean_pull or lamport_two_shot";
  if (algo == Algo::kOneShot && bytes > l.slot_bytes - uint64_t(kMaxChunks) * 16 - 16)
    return "x is too large for one-shot (limit: workspace capacity / world): use two-shot";
  if (algo == Algo::kLamport) {
    if (a.dtype == int(DType::kFloat32)) return "lamport takes bfloat16 or float16 (its sentinel is a 2-byte -0.0)";
    if (bytes > kLamportSlotBytes) return "x is too large for lamport (at most 2 MiB): use one_shot or two_shot";
    if (a.feed != int(Feed::kResident)) return "lamport takes a resident input (no track-and-trigger feed)";
    if (plan_row_group(a.hidden, lanes, kBlockThreads, 4, 4) < 0) return "lamport takes hidden <= 16384: use one_shot";
  }
  // Rows each CTA-chunk covers: of all rows (one-shot, two-shot), or of each rank's shard (lean, lamport_two_shot).
  int64_t span = a.tokens;
  if (lean) {
    if (a.feed != int(Feed::kResident)) return "lean takes a resident input (no track-and-trigger feed)";
    if (plan_row_group(a.hidden, lanes, kBlockThreads, 4, kLeanVecs) < 0)
      return "lean takes hidden <= 16384 (2-byte types) or 8192 (float32): use two_shot";
    a.shard_rows = (a.tokens + l.world - 1) / l.world;
    span = a.shard_rows;
    if (uint64_t(a.shard_rows) * nvr * 16 > l.slot_bytes) return "internal: lean slots overflow";
  } else if (algo == Algo::kLamportTwoShot) {  // lean's shards, each in one Lamport slot
    if (a.dtype == int(DType::kFloat32))
      return "lamport_two_shot takes bfloat16 or float16 (its sentinel is a 2-byte -0.0): use two_shot";
    if (a.feed != int(Feed::kResident)) return "lamport_two_shot takes a resident input (no track-and-trigger feed)";
    if (plan_row_group(a.hidden, lanes, kBlockThreads, 4, 4) < 0) return "lamport_two_shot takes hidden <= 16384: use two_shot";
    a.shard_rows = (a.tokens + l.world - 1) / l.world;
    span = a.shard_rows;
    if (uint64_t(a.shard_rows) * nvr * 16 > kLamportSlotBytes)
      return "x is too large for lamport_two_shot (a rank's shard of ceil(tokens / world) rows must be at most 2 MiB): "
             "use two_shot";
  } else if ((a.op & kOpShardedResidual) != 0) {
    return "a sharded residual needs algo lean, lean_bulk, lean_pull or lamport_two_shot";
  }
  int64_t rows = (span + int64_t(ctas) * chunks_per_cta - 1) / (int64_t(ctas) * chunks_per_cta);
  rows = rows < 1 ? 1 : rows;
  if ((span + rows - 1) / rows > kMaxChunks) rows = (span + kMaxChunks - 1) / kMaxChunks;
  if (chunk_rows > 0) {  // the caller's plan: checked, not re-derived
    if ((span + chunk_rows - 1) / chunk_rows > kMaxChunks) return "chunk_rows is too small: more than 4096 chunks";
    rows = chunk_rows;
  }
  a.chunk_rows = int(rows);
  a.n_chunks = int((span + rows - 1) / rows);
  a.ctas = ctas < a.n_chunks ? ctas : a.n_chunks;
  if (algo == Algo::kTwoShot) {
    // Chunk c's piece sits at c * piece_full in every slot; only the last chunk is shorter.
    const uint64_t piece_full = (uint64_t(a.chunk_rows) * nvr + l.world - 1) / l.world;
    const uint64_t last_rows = uint64_t(a.tokens) - uint64_t(a.n_chunks - 1) * a.chunk_rows;
    const uint64_t piece_last = (last_rows * nvr + l.world - 1) / l.world;
    if ((uint64_t(a.n_chunks - 1) * piece_full + piece_last) * 16 > l.slot_bytes) return "internal: two-shot slots overflow";
  }
  if (a.feed == int(Feed::kCopyEngine) && (algo != Algo::kTwoShot || a.n_chunks >= kMaxChunks))
    return "the copy-engine feed takes two-shot and at most 4095 chunks";  // chunk 4095's flag is the handshake
  a.sig = call_signature(a);
  return nullptr;
}

cudaError_t allreduce(const CommDevice& c, const CallArgs& a, Transport t, cudaStream_t stream) {
  if (t == Transport::kMultimem) {
    if (c.mc == nullptr) return cudaErrorInvalidValue;
    return launch_allreduce_multimem(c, a, stream);
  }
  return launch_allreduce_p2p(c, a, stream);
}

// Standalone add + RMSNorm, one pass: whole rows per CTA (no grid-stride loop), so several CTAs share an SM
// and one CTA's loads overlap another's reduction and stores. Threads per CTA and vectors per thread are
// compile-time (registers, not local memory); kNormConfigs below lists the instantiations.
// MinBlocks > 1 caps the registers so that many CTAs share an SM (occupancy is what the compiled norm wins by).
template <typename T, int Threads, int VPT, int MinBlocks = 1>
__global__ void __launch_bounds__(Threads, MinBlocks) add_rmsnorm_kernel(RowArgs ra, const Vec* x, Vec* residual,
                                                                         Vec* out, int64_t tokens) {
  __shared__ float red[2][Threads / 32];
  const int nvr = ra.hidden / Pack<T>::kLanes;
  const int64_t r0 = int64_t(blockIdx.x) * (Threads / ra.group);
  prefetch_l2(ra.weight, int64_t(ra.hidden) * int64_t(sizeof(T)));
  wait_for_prior_grid();  // PDL (pdl.cuh): only the weight is touched above
  const LocalSource<T> src{x, residual, nvr};
  const LocalSink sink{out, residual, nvr};
  finish_rows<T, Threads, VPT>(src, sink, ra, r0, min(r0 + Threads / ra.group, tokens), red);
}

// Persistent rows: each CTA walks rows r, r + stride, ... with the weight kept in registers for all of them,
// and issues the next row's x and residual loads before this row's reduction, so one row's barrier and
// stores overlap the next row's memory latency. Same arithmetic as finish_rows (z rounded to T, then the sum
// of squares of the rounded z): the same bits as the one-pass kernel.
template <typename T, int Threads, int VPT>
__global__ void __launch_bounds__(Threads, 2) add_rmsnorm_pipelined_kernel(RowArgs ra, const Vec* x, Vec* residual,
                                                                          Vec* out, int64_t tokens) {
  constexpr int L = Pack<T>::kLanes;
  __shared__ float red[2][Threads / 32];
  const int nvr = ra.hidden / L;
  const int G = ra.group;
  const int rows_per_pass = Threads / G;
  const int lane = threadIdx.x % G;
  const int64_t stride = int64_t(gridDim.x) * rows_per_pass;
  const Vec* w = reinterpret_cast<const Vec*>(ra.weight);
  Vec g[VPT], xa[VPT], ra_[VPT];
  auto load = [&](int64_t r, Vec(&xv)[VPT], Vec(&rv)[VPT]) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (r < tokens && j < nvr) {
        xv[k] = x[r * nvr + j];
        if (residual) rv[k] = residual[r * nvr + j];
      }
    }
  };
  prefetch_l2(ra.weight, int64_t(ra.hidden) * int64_t(sizeof(T)));
  wait_for_prior_grid();  // PDL (pdl.cuh): only the weight's L2 prefetch above (the previous kernel may write it)
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    if (lane + k * G < nvr) g[k] = w[lane + k * G];
  int64_t row = int64_t(blockIdx.x) * rows_per_pass + threadIdx.x / G;
  load(row, xa, ra_);
  int pass = 0;
  for (int64_t base = int64_t(blockIdx.x) * rows_per_pass; base < tokens; base += stride, row += stride, ++pass) {
    Vec xb[VPT], rb[VPT];
    load(row + stride, xb, rb);  // in flight during this row's reduction and stores
    const bool active = row < tokens;
    Vec z[VPT];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        float f[L];
        Pack<T>::unpack(xa[k], f);
        if (residual) {
          float r[L];
          Pack<T>::unpack(ra_[k], r);
#pragma unroll
          for (int i = 0; i < L; ++i) f[i] += r[i];
          z[k] = Pack<T>::pack(f);
          residual[row * nvr + j] = z[k];
          Pack<T>::unpack(z[k], f);
        } else {
          z[k] = xa[k];
        }
#pragma unroll
        for (int i = 0; i < L; ++i) ss += f[i] * f[i];
      }
    }
    const float rstd = rsqrtf(group_sum(ss, G, red[pass & 1]) / float(ra.hidden) + ra.eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        float f[L], gw[L];
        Pack<T>::unpack(z[k], f);
        Pack<T>::unpack(g[k], gw);
#pragma unroll
        for (int i = 0; i < L; ++i) f[i] = f[i] * rstd * gw[i];
        out[row * nvr + j] = Pack<T>::pack(f);
      }
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      xa[k] = xb[k];
      ra_[k] = rb[k];
    }
  }
}

// Two passes over each row, few registers: pass 1 computes z = round_T(x + residual), writes it back to the
// residual and sums its squares; pass 2 reads z again (the residual just written, from L2; x when there is no
// residual) with the weight and writes out. A thread holds Batch vectors (of each input) at a time instead of the
// whole row, so MinBlocks CTAs fit on an SM (the compiled norm's trade: occupancy for an L2 re-read).
// Each batch issues all its loads before its first store: the compiler may not move a load above a store that
// could alias it, so a plain loop waits one memory latency per vector (Batch 1: 2 x hidden / (8 G) latencies a row).
// Same arithmetic and order as finish_rows (per thread j = lane, lane + G, ...; then group_sum): same bits.
// Where pass 2 finds z (the compiled norm's pattern is kReread / kRereadHinted: bench/results/logs/inductor_norm/):
//   kZResidual    pass 1 writes z to the residual, pass 2 reads it back (from L2)
//   kReread       pass 1 stores nothing; pass 2 reads x and the residual again (L1 or L2), recomputes z and
//                 writes both results
//   kRereadHinted kReread with the compiled kernel's hints: pass 1 evict_last in L1 and L2, pass 2 evict_first
//   kStash        pass 1 keeps z in shared memory (rows of the CTA x hidden x sizeof(T), dynamic); pass 2 reads it
//                 there and writes both results: the compiled kernel's order of traffic (a read-only pass, then a
//                 write-only pass) without depending on L1 keeping the row
enum class ZSource { kZResidual, kReread, kRereadHinted, kStash };
template <int kPolicy>
__device__ __forceinline__ Vec load_hinted(const Vec* p, uint64_t policy) {
  Vec v;
  if constexpr (kPolicy == 0) {
    asm volatile("ld.global.L1::evict_last.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
  } else {
    asm volatile("ld.global.L1::evict_first.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
  }
  return v;
}

template <typename T, int Threads, int MinBlocks, int Batch, ZSource kZ = ZSource::kZResidual>
__global__ void __launch_bounds__(Threads, MinBlocks) add_rmsnorm_two_pass_kernel(RowArgs ra, const Vec* x,
                                                                                Vec* residual, Vec* out,
                                                                                int64_t tokens) {
  constexpr int L = Pack<T>::kLanes;
  __shared__ float red[2][Threads / 32];
  const int nvr = ra.hidden / L;
  const int G = ra.group;
  const int lane = threadIdx.x % G;
  const int64_t row = int64_t(blockIdx.x) * (Threads / G) + threadIdx.x / G;
  const Vec* w = reinterpret_cast<const Vec*>(ra.weight);
  prefetch_l2(ra.weight, int64_t(ra.hidden) * int64_t(sizeof(T)));
  wait_for_prior_grid();  // PDL (pdl.cuh): only the weight is touched above
  const bool active = row < tokens;
  const int64_t base = row * nvr;
  constexpr bool kReread = kZ == ZSource::kReread || kZ == ZSource::kRereadHinted;
  extern __shared__ __align__(16) Vec stash[];  // kStash: z of this CTA's rows
  Vec* my_stash = stash + int64_t(threadIdx.x / G) * nvr;
  uint64_t keep = 0, drop = 0;  // L2 policies of kRereadHinted
  if (kZ == ZSource::kRereadHinted) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(keep));
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(drop));
  }
  auto load = [&](const Vec* p, bool first_pass) {
    if constexpr (kZ == ZSource::kRereadHinted) return first_pass ? load_hinted<0>(p, keep) : load_hinted<1>(p, drop);
    return *p;
  };
  float ss = 0.f;
  // Without stores to global memory in pass 1 (all but kZResidual) nothing stops the loads of later batches from
  // moving up: unrolled, a thread has up to 4 batches of loads in flight.
  constexpr int kUnroll = kZ == ZSource::kZResidual ? 1 : 4;
  if (active) {
#pragma unroll kUnroll
    for (int j0 = lane; j0 < nvr; j0 += Batch * G) {
      Vec xv[Batch], rv[Batch];
#pragma unroll
      for (int b = 0; b < Batch; ++b) {
        const int j = j0 + b * G;
        if (j < nvr) {
          xv[b] = load(x + base + j, true);
          if (residual) rv[b] = load(residual + base + j, true);
        }
      }
#pragma unroll
      for (int b = 0; b < Batch; ++b) {
        const int j = j0 + b * G;
        if (j < nvr) {
          const Vec z = add_z<T>(xv[b], rv[b], residual != nullptr);
          if (kZ == ZSource::kStash) my_stash[j] = z;
          else if (residual && kZ == ZSource::kZResidual) residual[base + j] = z;
          float f[L];
          Pack<T>::unpack(z, f);
#pragma unroll
          for (int i = 0; i < L; ++i) ss += f[i] * f[i];
        }
      }
    }
  }
  const float rstd = rsqrtf(group_sum(ss, G, red[0]) / float(ra.hidden) + ra.eps);
  if (!active) return;
  const Vec* zs = residual && kZ == ZSource::kZResidual ? residual : x;  // this thread's own stores of pass 1
  for (int j0 = lane; j0 < nvr; j0 += Batch * G) {
    Vec zv[Batch], wv[Batch], rv[Batch];
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int j = j0 + b * G;
      if (j < nvr) {
        zv[b] = kZ == ZSource::kStash ? my_stash[j] : load(zs + base + j, false);
        if (kReread && residual) rv[b] = load(residual + base + j, false);
        wv[b] = w[j];
      }
    }
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int j = j0 + b * G;
      if (j < nvr) {
        if (kReread && residual) zv[b] = add_z<T>(zv[b], rv[b], true);
        if (kZ != ZSource::kZResidual && residual) residual[base + j] = zv[b];
        float f[L], gw[L];
        Pack<T>::unpack(zv[b], f);
        Pack<T>::unpack(wv[b], gw);
#pragma unroll
        for (int i = 0; i < L; ++i) f[i] = f[i] * rstd * gw[i];
        out[base + j] = Pack<T>::pack(f);
      }
    }
  }
}

// Bulk-pipelined rows: persistent CTAs stream their row sets (Threads / G consecutive rows, one per row group)
// through `stages` shared-memory stages that one thread fills with TMA bulk loads (bulk.cuh) of x and the
// residual, `stages` sets ahead of the threads that compute. Every other shape keeps a row's bytes in flight
// only between its loads and its first use, so an SM's bytes in flight fall while its rows reduce and store
// (DRAM at 41% of peak against the compiled norm's 47% at 1024 x 8192: docs/PERFORMANCE.md); here the copy
// engine keeps up to stages x 2 x hidden x sizeof(T) bytes per CTA in flight whatever the threads are doing.
// kBulkStore: z and out go back through the stage and leave as two bulk stores per set (no per-thread stores;
// the stage is refilled one set later, once the stores have read it), else each thread stores its vectors and
// the stage is refilled as soon as the set is done.
// Same arithmetic and order as finish_rows with the same row group (j = lane, lane + G, ...; group_sum): the
// bits of every shape with shape 0's group.
constexpr int kNormBulkMaxStages = 4;
// A local bulk copy completes in microseconds; one that has not after this long never will (a fault): the kernel
// prints which CTA waited and traps, so the call fails instead of hanging.
constexpr uint64_t kBulkLoadTimeoutNs = 10ull * 1000 * 1000 * 1000;

__device__ __forceinline__ void wait_bulk_loaded(uint64_t* bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t start = globaltimer_ns();
  for (uint32_t spin = 1;; ++spin) {
    if (mbar_try_wait(bar, parity)) return;
    if ((spin & 1023) == 0 && globaltimer_ns() - start > kBulkLoadTimeoutNs) {
      printf("tokenweave add_rmsnorm: a bulk load of CTA %d, thread %d did not complete in 10 s\n", int(blockIdx.x),
             int(threadIdx.x));
      __trap();
    }
  }
}

template <typename T, int Threads, int VPT, int CtasPerSm, bool kBulkStore>
__global__ void __launch_bounds__(Threads, CtasPerSm) add_rmsnorm_bulk_kernel(RowArgs ra, const Vec* x, Vec* residual,
                                                                             Vec* out, int64_t tokens, int stages) {
  constexpr int L = Pack<T>::kLanes;
  extern __shared__ __align__(128) Vec stage_mem[];  // per stage: the set's x rows, then its residual rows
  __shared__ uint64_t loaded[kNormBulkMaxStages];
  __shared__ float red[2][Threads / 32];
  const int nvr = ra.hidden / L;
  const int G = ra.group;
  const int rows_per_set = Threads / G;
  const int lane = threadIdx.x % G;
  const int sub = threadIdx.x / G;  // this thread's row within the set
  const int64_t sets = (tokens + rows_per_set - 1) / rows_per_set;
  const int64_t half = int64_t(rows_per_set) * nvr;  // vectors of one input in a stage
  const Vec* w = reinterpret_cast<const Vec*>(ra.weight);
  const bool has_res = residual != nullptr;
  prefetch_l2(ra.weight, int64_t(ra.hidden) * int64_t(sizeof(T)));
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&loaded[s], 1);
    fence_mbar_init();
  }
  __syncthreads();
  wait_for_prior_grid();  // PDL (pdl.cuh): only the weight's L2 prefetch and shared memory above
  // This CTA's set i is set blockIdx.x + i x gridDim.x, in stage i % stages. Thread 0 only.
  auto rows_of = [&](int64_t set) { return set * rows_per_set; };
  auto bytes_of = [&](int64_t set) {
    const int64_t rows = tokens - rows_of(set) < rows_per_set ? tokens - rows_of(set) : rows_per_set;
    return uint32_t(rows * nvr * 16);
  };
  auto load_set = [&](int64_t i) {
    const int64_t set = int64_t(blockIdx.x) + i * int64_t(gridDim.x);
    if (set >= sets) return;
    Vec* st = stage_mem + (i % stages) * 2 * half;
    uint64_t* bar = &loaded[i % stages];
    const uint32_t bytes = bytes_of(set);
    mbar_expect_tx(bar, has_res ? 2 * bytes : bytes);
    bulk_load(st, x + rows_of(set) * nvr, bytes, bar);
    if (has_res) bulk_load(st + half, residual + rows_of(set) * nvr, bytes, bar);
  };
  if (threadIdx.x == 0)
    for (int i = 0; i < stages; ++i) load_set(i);
  Vec g[VPT];  // the weight, for every set (persistent CTA)
  if (w != nullptr) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) g[k] = w[lane + k * G < nvr ? lane + k * G : 0];
  }
  for (int64_t i = 0;; ++i) {
    const int64_t set = int64_t(blockIdx.x) + i * int64_t(gridDim.x);
    if (set >= sets) break;
    const int s = int(i % stages);
    Vec* xs = stage_mem + s * 2 * half + int64_t(sub) * nvr;
    Vec* rs = xs + half;
    const int64_t row = rows_of(set) + sub;
    const bool active = row < tokens;
    wait_bulk_loaded(&loaded[s], uint32_t(i / stages) & 1u);
    // Pass 1: z = round_T(x + residual) into the stage's x rows (registers hold the weight, not z), the sum of
    // squares.
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        const Vec z = add_z<T>(xs[j], rs[j], has_res);
        if (has_res) {
          xs[j] = z;
          if (!kBulkStore) residual[row * nvr + j] = z;
        }
        float f[L];
        Pack<T>::unpack(z, f);
#pragma unroll
        for (int i2 = 0; i2 < L; ++i2) ss += f[i2] * f[i2];
      }
    }
    // Pass 2: out from this thread's own z (program order), into the stage's residual rows or to memory.
    const float rstd = w != nullptr ? rsqrtf(group_sum(ss, G, red[i & 1]) / float(ra.hidden) + ra.eps) : 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        Vec v = xs[j];
        if (w != nullptr) {
          float f[L], gw[L];
          Pack<T>::unpack(v, f);
          Pack<T>::unpack(g[k], gw);
#pragma unroll
          for (int i2 = 0; i2 < L; ++i2) f[i2] = f[i2] * rstd * gw[i2];
          v = Pack<T>::pack(f);
        }
        if (kBulkStore) rs[j] = v;
        else out[row * nvr + j] = v;
      }
    }
    fence_proxy_async_shared();  // this thread's writes to the stage, before the bulk copies that read or refill it
    __syncthreads();
    if (threadIdx.x == 0) {
      if (kBulkStore) {
        Vec* st = stage_mem + s * 2 * half;
        if (has_res) bulk_store(residual + rows_of(set) * nvr, st, bytes_of(set));
        bulk_store(out + rows_of(set) * nvr, st + half, bytes_of(set));
        bulk_commit();
        if (stages == 1) {  // one stage (the longest rows): refill it once these stores have read it
          bulk_wait_read<0>();
          load_set(i + 1);
        } else {  // the previous set's stores have read its stage: refill that one, this one's stores go on
          bulk_wait_read<1>();
          if (i >= 1) load_set(i - 1 + stages);
        }
      } else {
        load_set(i + stages);
      }
    }
  }
  if (kBulkStore && threadIdx.x == 0) bulk_wait_all();  // the stores done before the CTA (and its stages) exits
}

// (threads per CTA, target vectors per thread, most vectors per thread, persistent + pipelined rows).
// Config 0 picks per call (add_rmsnorm below); the others are fixed shapes that bench/add_rmsnorm.py times
// side by side (tokenweave_cfgK): register-capped arrays decide occupancy, and persistence hides latency.
struct NormConfig {
  int threads, target_vecs, max_vecs;
  bool pipelined;
};
// Two-pass shapes (9, 10, 12) keep no row in registers: any row length fits (kTwoPassVecs bounds nothing).
constexpr int kTwoPassVecs = 1 << 20;
constexpr NormConfig kNormConfigs[] = {{256, 4, 4, false},  {256, 4, 4, false},           {256, 4, 8, false},
                                       {512, 4, 8, false},  {256, 4, 4, true},            {512, 2, 2, true},
                                       {1024, 1, 2, false}, {512, 2, 2, false},           {512, 2, 2, false},
                                       {256, 4, kTwoPassVecs, false}, {128, 8, kTwoPassVecs, false},
                                       {128, 4, 4, false},  {256, 4, kTwoPassVecs, false},
                                       // bulk-pipelined (13-16): shape 1's groups (and 13-14 shape 2's beyond 4
                                       // vectors a thread), so they have shape 0's bits wherever they hold the row
                                       {256, 4, 8, false},  {256, 4, 8, false},           {256, 4, 4, false},
                                       {256, 4, 4, false},
                                       // two passes, the compiled norm's reads (17-20): shape 9's groups
                                       {256, 4, kTwoPassVecs, false}, {256, 4, kTwoPassVecs, false},
                                       {256, 4, kTwoPassVecs, false}, {512, 4, kTwoPassVecs, false},
                                       {256, 4, kTwoPassVecs, false}, {256, 4, kTwoPassVecs, false},
                                       {512, 4, kTwoPassVecs, false}};
constexpr int kNormConfigCount = int(sizeof(kNormConfigs) / sizeof(kNormConfigs[0]));

int add_rmsnorm_configs() { return kNormConfigCount; }

template <typename T, int Threads, int VPT, bool kPipelined, int MinBlocks = 1>
cudaError_t launch_add_rmsnorm(const RowArgs& ra, const void* x, void* residual, void* out, int64_t tokens,
                               cudaStream_t stream) {
  const int rows_per_cta = Threads / ra.group;
  int64_t blocks = (tokens + rows_per_cta - 1) / rows_per_cta;
  const Vec* xv = reinterpret_cast<const Vec*>(x);
  if constexpr (kPipelined) {
    // Persistent: as many CTAs as are resident at once, no more (a second wave would only re-load the weight).
    static int per_sm = 0;  // per instantiation; the occupancy does not depend on the call
    if (per_sm == 0 &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, add_rmsnorm_pipelined_kernel<T, Threads, VPT>,
                                                      Threads, 0) != cudaSuccess)
      return cudaGetLastError();
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    blocks = blocks < int64_t(sms) * per_sm ? blocks : int64_t(sms) * per_sm;
    return launch_kernel(add_rmsnorm_pipelined_kernel<T, Threads, VPT>, dim3(unsigned(blocks)), dim3(Threads), stream,
                         ra, xv, reinterpret_cast<Vec*>(residual), reinterpret_cast<Vec*>(out), tokens);
  }
  return launch_kernel(add_rmsnorm_kernel<T, Threads, VPT, MinBlocks>, dim3(unsigned(blocks)), dim3(Threads), stream,
                       ra, xv, reinterpret_cast<Vec*>(residual), reinterpret_cast<Vec*>(out), tokens);
}

template <typename T, int Threads, int MinBlocks, int Batch = 1, ZSource kZ = ZSource::kZResidual>
cudaError_t launch_add_rmsnorm_two_pass(const RowArgs& ra, const void* x, void* residual, void* out, int64_t tokens,
                                        cudaStream_t stream) {
  auto* kernel = add_rmsnorm_two_pass_kernel<T, Threads, MinBlocks, Batch, kZ>;
  const int rows_per_cta = Threads / ra.group;
  const int64_t blocks = (tokens + rows_per_cta - 1) / rows_per_cta;
  size_t smem = 0;
  if constexpr (kZ == ZSource::kStash) {
    smem = size_t(rows_per_cta) * size_t(ra.hidden) * sizeof(T);
    static size_t allowed = 48 << 10;  // per instantiation: dynamic shared memory allowed so far (48 KiB needs no opt-in)
    if (smem > allowed) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e != cudaSuccess) return e;
      allowed = smem;
    }
  }
  return launch_kernel_smem(kernel, dim3(unsigned(blocks)), dim3(Threads), smem, stream,
                       ra, reinterpret_cast<const Vec*>(x), reinterpret_cast<Vec*>(residual), reinterpret_cast<Vec*>(out),
                       tokens);
}

template <typename T, int Threads, int VPT, int CtasPerSm, bool kBulkStore>
cudaError_t launch_add_rmsnorm_bulk(const RowArgs& ra, const void* x, void* residual, void* out, int64_t tokens,
                                    cudaStream_t stream) {
  auto* kernel = add_rmsnorm_bulk_kernel<T, Threads, VPT, CtasPerSm, kBulkStore>;
  int dev = 0, sms = 0, smem_sm = 0, smem_cta = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  cudaDeviceGetAttribute(&smem_cta, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) return cudaGetLastError();
  // Per CTA: the SM's shared memory shared by CtasPerSm CTAs, less the 1 KiB the runtime reserves for each CTA and
  // the kernel's static arrays.
  int64_t budget = int64_t(smem_sm) / CtasPerSm - 1024 - int64_t(fa.sharedSizeBytes);
  budget = budget < smem_cta - int64_t(fa.sharedSizeBytes) ? budget : smem_cta - int64_t(fa.sharedSizeBytes);
  const int rows_per_set = Threads / ra.group;
  const int64_t stage_bytes = 2 * int64_t(rows_per_set) * (ra.hidden / (16 / int(sizeof(T)))) * 16;
  int64_t stages = budget / stage_bytes;
  stages = stages < kNormBulkMaxStages ? stages : kNormBulkMaxStages;
  if (stages < 1) return cudaErrorInvalidValue;
  static int64_t allowed = 0;  // per instantiation: the dynamic shared memory this kernel was allowed so far
  if (allowed < budget) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(budget));
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (e != cudaSuccess) return e;
    allowed = budget;
  }
  const int64_t sets = (tokens + rows_per_set - 1) / rows_per_set;
  const int64_t blocks = sets < int64_t(sms) * CtasPerSm ? sets : int64_t(sms) * CtasPerSm;
  return launch_kernel_smem(kernel, dim3(unsigned(blocks)), dim3(Threads), size_t(stages * stage_bytes), stream, ra,
                            reinterpret_cast<const Vec*>(x), reinterpret_cast<Vec*>(residual),
                            reinterpret_cast<Vec*>(out), tokens, int(stages));
}

template <typename T>
cudaError_t add_rmsnorm_typed(int config, const RowArgs& ra, const void* x, void* residual, void* out,
                              int64_t tokens, cudaStream_t stream) {
  switch (config) {
    case 0:
    case 1: return launch_add_rmsnorm<T, 256, 4, false>(ra, x, residual, out, tokens, stream);
    case 2: return launch_add_rmsnorm<T, 256, 8, false>(ra, x, residual, out, tokens, stream);
    case 3: return launch_add_rmsnorm<T, 512, 8, false>(ra, x, residual, out, tokens, stream);
    case 4: return launch_add_rmsnorm<T, 256, 4, true>(ra, x, residual, out, tokens, stream);
    case 5: return launch_add_rmsnorm<T, 512, 2, true>(ra, x, residual, out, tokens, stream);
    case 6: return launch_add_rmsnorm<T, 1024, 2, false>(ra, x, residual, out, tokens, stream);
    // 512 threads x 2 vectors capped at 32 registers: 4 CTAs (2048 threads) per SM, as the compiled norm runs
    case 7: return launch_add_rmsnorm<T, 512, 2, false, 4>(ra, x, residual, out, tokens, stream);
    case 8: return launch_add_rmsnorm<T, 512, 2, false, 3>(ra, x, residual, out, tokens, stream);  // 40 registers
    // two passes, 32 registers: 8 x 256 and 16 x 128 threads per SM (2048, the compiled norm's occupancy)
    case 9: return launch_add_rmsnorm_two_pass<T, 256, 8>(ra, x, residual, out, tokens, stream);
    case 10: return launch_add_rmsnorm_two_pass<T, 128, 16>(ra, x, residual, out, tokens, stream);
    // one row per CTA up to 4 x 128 vectors (hidden 4096 in 2-byte types; shape 1 takes two such rows per CTA):
    // below one row per SM, rows spread over twice the SMs, and a row streams at one SM's L2 bandwidth
    case 11: return launch_add_rmsnorm<T, 128, 4, false>(ra, x, residual, out, tokens, stream);
    // shape 9 with both loads of two vectors in flight before their stores: 40 registers, 6 CTAs per SM (a batch
    // of 2 at 8 CTAs spilled, and a batch of 4 at 4 CTAs beat no shipped choice: bench/results/variants/366fe1d)
    case 12: return launch_add_rmsnorm_two_pass<T, 256, 6, 2>(ra, x, residual, out, tokens, stream);
    // bulk-pipelined (add_rmsnorm_bulk_kernel), each thread storing its vectors or bulk stores from the stage:
    // 2 CTAs per SM (3 stages of 32 KiB at 8192 x 2 bytes), or 3 with 4 vectors a thread (8 spilled at their
    // 80 registers) and 2 stages
    case 13: return launch_add_rmsnorm_bulk<T, 256, 8, 2, false>(ra, x, residual, out, tokens, stream);
    case 14: return launch_add_rmsnorm_bulk<T, 256, 8, 2, true>(ra, x, residual, out, tokens, stream);
    case 15: return launch_add_rmsnorm_bulk<T, 256, 4, 3, false>(ra, x, residual, out, tokens, stream);
    case 16: return launch_add_rmsnorm_bulk<T, 256, 4, 3, true>(ra, x, residual, out, tokens, stream);
    // two passes as the compiled norm runs them (kReread): default caching, then its L1 / L2 hints, then those at
    // 512 threads (two rows, 4 CTAs per SM: the compiled kernel's occupancy)
    case 17: return launch_add_rmsnorm_two_pass<T, 256, 8, 1, ZSource::kReread>(ra, x, residual, out, tokens, stream);
    case 18: return launch_add_rmsnorm_two_pass<T, 256, 8, 1, ZSource::kRereadHinted>(ra, x, residual, out, tokens, stream);
    case 19: return launch_add_rmsnorm_two_pass<T, 256, 6, 2, ZSource::kRereadHinted>(ra, x, residual, out, tokens, stream);
    case 20: return launch_add_rmsnorm_two_pass<T, 512, 4, 1, ZSource::kRereadHinted>(ra, x, residual, out, tokens, stream);
    // z kept in shared memory between the passes: 8 x 256, 6 x 256 (two vectors a batch), 4 x 512 threads per SM
    case 21: return launch_add_rmsnorm_two_pass<T, 256, 8, 1, ZSource::kStash>(ra, x, residual, out, tokens, stream);
    case 22: return launch_add_rmsnorm_two_pass<T, 256, 6, 2, ZSource::kStash>(ra, x, residual, out, tokens, stream);
    case 23: return launch_add_rmsnorm_two_pass<T, 512, 4, 1, ZSource::kStash>(ra, x, residual, out, tokens, stream);
  }
  return cudaErrorInvalidValue;
}

static int group_of(int config, int hidden, DType dtype) {
  const NormConfig& g = kNormConfigs[config];
  return plan_row_group(hidden, lanes_of(dtype), g.threads, g.target_vecs, g.max_vecs);
}

// Shape 0: the fallback where the card's config ("norm", tokenweave.tuning.norm_shape) names no shape: the
// one-pass shape that holds the row in the fewest registers (4 vectors x 256 threads, else 8 x 256: hidden up to
// 16384 for 2-byte types, else 8 x 512). Measured choices by size live in the config, not here.
static int resolve_config(int config, int hidden, DType dtype) {
  if (config != 0) return config;
  return group_of(1, hidden, dtype) > 0 ? 1 : group_of(2, hidden, dtype) > 0 ? 2 : 3;
}

int add_rmsnorm_row_group(int config, int hidden, DType dtype) {
  if (config < 0 || config >= kNormConfigCount || hidden % 8 != 0 || hidden < 8) return -1;
  return group_of(resolve_config(config, hidden, dtype), hidden, dtype);
}

cudaError_t add_rmsnorm(const void* x, void* residual, const void* weight, void* out, int64_t tokens, int hidden,
                        float eps, DType dtype, cudaStream_t stream, int config) {
  if (config < 0 || config >= kNormConfigCount || hidden % 8 != 0 || tokens < 1) return cudaErrorInvalidValue;
  config = resolve_config(config, hidden, dtype);
  const int group = group_of(config, hidden, dtype);
  if (group < 0) return cudaErrorInvalidValue;
  const RowArgs ra{weight, hidden, group, eps};
  switch (dtype) {
    case DType::kBFloat16: return add_rmsnorm_typed<__nv_bfloat16>(config, ra, x, residual, out, tokens, stream);
    case DType::kFloat16: return add_rmsnorm_typed<__half>(config, ra, x, residual, out, tokens, stream);
    case DType::kFloat32: return add_rmsnorm_typed<float>(config, ra, x, residual, out, tokens, stream);
  }
  return cudaErrorInvalidValue;
}

// Track-and-trigger, producer side: runs after the GEMM that wrote chunks [begin, end) on the same
// stream, so the GEMM's stores happen before this release; wait_ready acquires it.
__global__ void mark_ready_kernel(uint32_t* ready, int begin, int end, uint32_t pieces) {
  const int ch = begin + int(blockIdx.x * blockDim.x + threadIdx.x);
  if (ch < end) asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(ready + ch), "r"(pieces) : "memory");
}

cudaError_t mark_ready(uint32_t* ready, int begin, int end, uint32_t pieces, cudaStream_t stream) {
  if (begin < 0 || end > kMaxChunks || begin >= end) return cudaErrorInvalidValue;
  mark_ready_kernel<<<(end - begin + 255) / 256, 256, 0, stream>>>(ready, begin, end, pieces);
  return cudaGetLastError();
}

__global__ void peer_probe_kernel(const CommDevice c, uint64_t magic, uint64_t* result) {
  const int q = threadIdx.x;
  if (q >= c.world) return;
  volatile uint64_t* slot = reinterpret_cast<uint64_t*>(c.ws[q] + c.layout.probe_off) + c.rank;
  *slot = magic + (uint64_t(c.rank) << 8) + q;
  __threadfence_system();
  result[q] = *slot;
}

cudaError_t peer_probe(const CommDevice& c, uint64_t magic, uint64_t* result, cudaStream_t stream) {
  peer_probe_kernel<<<1, 32, 0, stream>>>(c, magic, result);
  return cudaGetLastError();
}

}  // namespace tokenweave
