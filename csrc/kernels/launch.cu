// Torch-free launchers: planning, transport dispatch, the standalone add + RMSNorm, the peer probe.
#include <algorithm>
#include <atomic>

#include "tokenweave/pdl.cuh"
#include "tokenweave/rownorm.cuh"
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

// Two passes over each row, few registers: pass 1 computes z = round_T(x + residual) and sums its squares; pass 2
// takes z again with the weight and writes out. A thread holds Batch vectors (of each input) at a time instead of
// the whole row, so MinBlocks CTAs fit on an SM (the compiled norm's trade: occupancy for a second pass).
// Where pass 2 finds z:
//   kStash false: pass 1 writes z back to the residual and pass 2 reads it there (from L2; x when there is no
//                 residual). Each batch issues all its loads before its first store: the compiler may not move a
//                 load above a store that could alias it, so a plain loop waits one memory latency per vector
//                 (Batch 1: 2 x hidden / (8 G) latencies a row).
//   kStash true:  pass 1 keeps z in shared memory (rows of the CTA x hidden x sizeof(T), dynamic) and stores
//                 nothing; pass 2 reads it there and writes the residual and out: the order of traffic of the
//                 compiled norm (bench/results/logs/inductor_norm/: a read-only pass, then a write-only pass)
//                 without its re-read of x and the residual, which hits L1 only while 4 rows of 32 KiB fit there.
//                 With no global store in pass 1, a thread keeps 2 vectors of each input in flight.
// Same arithmetic and order as finish_rows (per thread j = lane, lane + G, ...; then group_sum): same bits.
template <typename T, int Threads, int MinBlocks, int Batch, bool kStash = false>
__global__ void __launch_bounds__(Threads, MinBlocks) add_rmsnorm_two_pass_kernel(RowArgs ra, const Vec* x,
                                                                                Vec* residual, Vec* out,
                                                                                int64_t tokens) {
  constexpr int L = Pack<T>::kLanes;
  __shared__ float red[2][Threads / 32];
  extern __shared__ __align__(16) Vec stash[];  // kStash: z of this CTA's rows, row after row
  const int nvr = ra.hidden / L;
  const int G = ra.group;
  const int lane = threadIdx.x % G;
  const int64_t row = int64_t(blockIdx.x) * (Threads / G) + threadIdx.x / G;
  Vec* my_stash = stash + int64_t(threadIdx.x / G) * nvr;
  const Vec* w = reinterpret_cast<const Vec*>(ra.weight);
  prefetch_l2(ra.weight, int64_t(ra.hidden) * int64_t(sizeof(T)));
  wait_for_prior_grid();  // PDL (pdl.cuh): only the weight is touched above
  const bool active = row < tokens;
  const int64_t base = row * nvr;
  float ss = 0.f;
  // z of vector j: into the stash or back to the residual; its squares into ss, in the order of j
  auto take = [&](int j, Vec xv, Vec rv) {
    const Vec z = add_z<T>(xv, rv, residual != nullptr);
    if (kStash) my_stash[j] = z;
    else if (residual) residual[base + j] = z;
    float f[L];
    Pack<T>::unpack(z, f);
#pragma unroll
    for (int i = 0; i < L; ++i) ss += f[i] * f[i];
  };
  if (active) {
    int j0 = lane;
    // No global store in this pass: kWide vectors of each input in flight without bound checks between them (4 spill
    // at the 32 registers of 2048 threads an SM; 2 x 2 x 16 bytes x 2048 threads is 128 KiB in flight an SM).
    if constexpr (kStash) {
      constexpr int kWide = 2;
      for (; j0 + (kWide - 1) * G < nvr; j0 += kWide * G) {
        Vec xv[kWide], rv[kWide];
#pragma unroll
        for (int u = 0; u < kWide; ++u) {
          xv[u] = x[base + j0 + u * G];
          if (residual) rv[u] = residual[base + j0 + u * G];
        }
#pragma unroll
        for (int u = 0; u < kWide; ++u) take(j0 + u * G, xv[u], rv[u]);
      }
    }
    for (; j0 < nvr; j0 += Batch * G) {
      Vec xv[Batch], rv[Batch];
#pragma unroll
      for (int b = 0; b < Batch; ++b) {
        const int j = j0 + b * G;
        if (j < nvr) {
          xv[b] = x[base + j];
          if (residual) rv[b] = residual[base + j];
        }
      }
#pragma unroll
      for (int b = 0; b < Batch; ++b)
        if (j0 + b * G < nvr) take(j0 + b * G, xv[b], rv[b]);
    }
  }
  const float rstd = rsqrtf(group_sum(ss, G, red[0]) / float(ra.hidden) + ra.eps);
  if (!active) return;
  const Vec* zs = kStash ? my_stash : (residual ? residual + base : x + base);  // this thread's own writes of pass 1
  for (int j0 = lane; j0 < nvr; j0 += Batch * G) {
    Vec zv[Batch], wv[Batch];
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int j = j0 + b * G;
      if (j < nvr) {
        zv[b] = zs[j];
        wv[b] = w[j];
      }
    }
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int j = j0 + b * G;
      if (j < nvr) {
        if (kStash && residual) residual[base + j] = zv[b];
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

// One row per CTA, read and written in 8-byte pieces, kPieces per input a thread, Threads x 8 bytes (4 KiB at 512
// threads) apart: LDG.E.64 at immediate offsets, as the compiled norm's kernel was seen to. 2-byte types (group_of:
// G = Threads). Other bits than shape 0 (another element order), so tokenweave-tune takes them only as a family
// serving every count of a hidden (tune.norm_families): the shipped H200 config serves hidden 8192 with 16, 22, 23
// and 20 and hidden 4096 with 18 and 24 (bench/results/add_rmsnorm-h200-tp1.json; docs/PERFORMANCE.md).
// kOrder, the order of a row's traffic (each sums the same pieces in the same order: equal Threads and kPieces give
// equal bits):
//   kPiecesEarly   a residual piece is written as soon as z is formed, before the reduction (shape 16)
//   kPiecesLate    every write after the reduction, out then the residual a piece, z held packed in registers
//   kPiecesReread  the compiled norm's order (bench/results/logs/inductor_norm/): pass 1 only loads x and the
//                  residual (evict_last in L1 and L2); pass 2 loads them again (evict_first: from L1, where the
//                  CTA's row stayed) with the weight (evict_last), then writes out and the residual a piece. Nothing
//                  but the sum of squares lives across the reduction.
//   kPiecesRereadInOrder  kPiecesReread whose loads and stores keep program order (volatile), so pass 2 takes one
//                  piece at a time (loads of x, the residual and the weight, then its stores), as the compiled norm's
//                  loop over 2048-element blocks at hidden 4096 runs (Triton's loads and stores are volatile asm)
// Both passes of kPiecesRereadInOrder as loops, not unrolled (shapes 28-30 of 5674140), ran 0.78-0.87x of the
// compiled norm from 4096 tokens (the norm bench at 5674140) and were removed.
enum PiecesOrder { kPiecesEarly, kPiecesLate, kPiecesReread, kPiecesRereadInOrder };

// An 8-byte load with an L1 eviction priority and an L2 policy made beside it (createpolicy), as Triton emits its
// eviction_policy; a policy made once and held would cost two registers for the whole kernel. kInOrder: volatile,
// so it stays in program order with store_piece_in_order (the compiler may move the others).
template <bool kKeep, bool kInOrder = false>
__device__ __forceinline__ uint2 load_piece_hinted(const uint2* p) {
  uint2 v;
  if constexpr (kInOrder && kKeep)
    asm volatile("{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_last.b64 policy, 1.0;\n"
                 "ld.global.L1::evict_last.L2::cache_hint.v2.u32 {%0, %1}, [%2], policy;\n}"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  else if constexpr (kInOrder)
    asm volatile("{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
                 "ld.global.L1::evict_first.L2::cache_hint.v2.u32 {%0, %1}, [%2], policy;\n}"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  else if constexpr (kKeep)
    asm("{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_last.b64 policy, 1.0;\n"
                 "ld.global.L1::evict_last.L2::cache_hint.v2.u32 {%0, %1}, [%2], policy;\n}"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  else
    asm("{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
                 "ld.global.L1::evict_first.L2::cache_hint.v2.u32 {%0, %1}, [%2], policy;\n}"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ void store_piece_in_order(uint2* p, uint2 v) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y));
}

// kExact: the launcher's promise that the row is exactly kPieces x Threads pieces and a residual is given, so the
// kernel has no branch at all. Each guard of the general form sits between a load and the next, and the compiler
// may place a use of the first load's value inside it: in the in-order shape 25 (512 x 2 pieces) the residual's
// first piece was unpacked right after its load, so the second piece's loads waited one DRAM latency behind it
// (cuobjdump -sass of 5674140; Nsight Compute at 16384 x 4096, bench/results/variants/01cc739: DRAM 72% busy against
// the compiled norm's 85%, which is built for its static shape and has no branch). Its exact form keeps DRAM as busy
// as the compiled norm (83.4-84.8% against 84.0-85.1%, variants/1ed6e1f; .ci/check_kernels.py checks that every
// exact kernel issues its first-pass loads before reading one). Same bits as the general form, which divides the sum
// of squares by the same power of two (Threads x kPieces x 4) and adds eps: the exact form compiles to one
// fma(sum, 2^-k, eps), equal wherever sum x 2^-k is exact in fp32, i.e. unless eps is about 0 and a row's sum of
// squares is below about 1e-34 (tests/gpu/test_launch_gpu.py compares the two forms).
template <typename T, int Threads, int kPieces, int kOrder, int kCtasPerSm, bool kExact>
__global__ void __launch_bounds__(Threads, kCtasPerSm) add_rmsnorm_pieces_kernel(RowArgs ra, const uint2* x,
                                                                                     uint2* residual, uint2* out,
                                                                                     int64_t tokens) {
  static_assert(sizeof(T) == 2, "8-byte pieces of 4 elements");
  constexpr int kRowPieces = kPieces * Threads;
  __shared__ float red[2][Threads / 32];
  const int npr = kExact ? kRowPieces : ra.hidden / 4;  // <= kPieces x Threads pieces a row
  const int64_t base = int64_t(blockIdx.x) * npr;
  const bool has_residual = kExact || residual != nullptr;
  const uint2* xr = x + base + threadIdx.x;
  uint2* rr = residual + (has_residual ? base + threadIdx.x : 0);  // only dereferenced where has_residual
  uint2* orow = out + base + threadIdx.x;
  const uint2* wr = reinterpret_cast<const uint2*>(ra.weight) + threadIdx.x;
  const bool full = kExact || npr == kRowPieces;  // every piece in range: no guard between the loads
  auto in_row = [&](int k) { return full || int(threadIdx.x) + k * Threads < npr; };
  auto z_of = [&](uint2 xp, uint2 rp) {  // without a residual rp is never set, and add_z ignores it
    const Vec z = add_z<T>(Vec{xp.x, xp.y, 0u, 0u}, Vec{rp.x, rp.y, 0u, 0u}, has_residual);
    return uint2{z.x, z.y};
  };
  // pass 2 of the in-order re-reads: a piece's loads (from L1, evict_first; the weight evict_last), then its stores
  auto finish_in_order = [&](int k, float rstd) {
    const uint2 xp = load_piece_hinted<false, true>(xr + k * Threads);
    const uint2 rp = has_residual ? load_piece_hinted<false, true>(rr + k * Threads) : uint2{0u, 0u};
    const uint2 wp = load_piece_hinted<true, true>(wr + k * Threads);
    const uint2 z = z_of(xp, rp);
    float gw[8], f[8];
    Pack<T>::unpack(Vec{wp.x, wp.y, 0u, 0u}, gw);
    Pack<T>::unpack(Vec{z.x, z.y, 0u, 0u}, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = f[i] * rstd * gw[i];
    const Vec o = Pack<T>::pack(f);
    store_piece_in_order(orow + k * Threads, uint2{o.x, o.y});
    if (has_residual) store_piece_in_order(rr + k * Threads, z);
  };
  wait_for_prior_grid();
  uint2 xv[kPieces], rv[kPieces];
#pragma unroll
  for (int k = 0; k < kPieces; ++k) {
    if (in_row(k)) {
      if constexpr (kOrder == kPiecesReread || kOrder == kPiecesRereadInOrder) {
        constexpr bool kInOrder = kOrder == kPiecesRereadInOrder;
        xv[k] = load_piece_hinted<true, kInOrder>(xr + k * Threads);
        if (has_residual) rv[k] = load_piece_hinted<true, kInOrder>(rr + k * Threads);
      } else {
        xv[k] = xr[k * Threads];
        if (has_residual) rv[k] = rr[k * Threads];
      }
    }
  }
  float ss = 0.f;
  uint2 zp[kPieces];
#pragma unroll
  for (int k = 0; k < kPieces; ++k) {
    if (in_row(k)) {
      zp[k] = z_of(xv[k], rv[k]);
      if (kOrder == kPiecesEarly && has_residual) rr[k * Threads] = zp[k];
      float f[8];
      Pack<T>::unpack(Vec{zp[k].x, zp[k].y, 0u, 0u}, f);
#pragma unroll
      for (int i = 0; i < 4; ++i) ss += f[i] * f[i];
    }
  }
  const float rstd = rsqrtf(group_sum(ss, Threads, red[0]) / float(kExact ? 4 * kRowPieces : ra.hidden) + ra.eps);
  if constexpr (kOrder == kPiecesRereadInOrder) {
#pragma unroll
    for (int k = 0; k < kPieces; ++k)
      if (in_row(k)) finish_in_order(k, rstd);
  } else {
    uint2 wv[kPieces];
    if constexpr (kOrder == kPiecesReread) {
#pragma unroll
      for (int k = 0; k < kPieces; ++k) {
        if (in_row(k)) {
          xv[k] = load_piece_hinted<false>(xr + k * Threads);
          if (has_residual) rv[k] = load_piece_hinted<false>(rr + k * Threads);
          wv[k] = load_piece_hinted<true>(wr + k * Threads);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kPieces; ++k) {
      if (in_row(k)) {
        if constexpr (kOrder == kPiecesReread) zp[k] = z_of(xv[k], rv[k]);
        else wv[k] = wr[k * Threads];
        float gw[8], f[8];
        Pack<T>::unpack(Vec{wv[k].x, wv[k].y, 0u, 0u}, gw);
        Pack<T>::unpack(Vec{zp[k].x, zp[k].y, 0u, 0u}, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = f[i] * rstd * gw[i];
        const Vec o = Pack<T>::pack(f);
        orow[k * Threads] = uint2{o.x, o.y};
        if (kOrder != kPiecesEarly && has_residual) rr[k * Threads] = zp[k];
      }
    }
  }
}

// (threads per CTA, target vectors per thread, most vectors per thread, persistent + pipelined rows).
// Config 0 picks per call (add_rmsnorm below); the others are fixed shapes that bench/add_rmsnorm.py times
// side by side (tokenweave_cfgK): register-capped arrays decide occupancy, and persistence hides latency.
struct NormConfig {
  int threads, target_vecs, max_vecs;
  bool pipelined;
  bool stash = false;  // z of the CTA's rows in shared memory: rows x hidden x sizeof(T) <= kStashMaxBytes
  bool pieces = false;  // 8-byte pieces (add_rmsnorm_pieces_kernel): 2-byte types, one row a CTA, another element order
};
// The stash shapes' rows must fit a CTA's opt-in shared memory on sm_90 (227 KiB = 232448 bytes on H100 and H200),
// less 1 KiB for the kernel's static arrays (at most 128 bytes).
constexpr int64_t kStashMaxBytes = 232448 - 1024;
// Two-pass shapes (9, 10, 12-15) keep no row in registers: any row length fits (kTwoPassVecs bounds nothing) but
// in the shapes that keep z in shared memory (13-15, `stash`), whose rows must fit kStashMaxBytes.
constexpr int kTwoPassVecs = 1 << 20;
constexpr NormConfig kNormConfigs[] = {{256, 4, 4, false},  {256, 4, 4, false},           {256, 4, 8, false},
                                       {512, 4, 8, false},  {256, 4, 4, true},            {512, 2, 2, true},
                                       {1024, 1, 2, false}, {512, 2, 2, false},           {512, 2, 2, false},
                                       {256, 4, kTwoPassVecs, false}, {128, 8, kTwoPassVecs, false},
                                       {128, 4, 4, false},  {256, 4, kTwoPassVecs, false},
                                       {256, 4, kTwoPassVecs, false, true}, {256, 4, kTwoPassVecs, false, true},
                                       {512, 4, kTwoPassVecs, false, true}, {512, 2, 2, false, false, true},
                                       {256, 2, 2, false, false, true},     {512, 1, 1, false, false, true},
                                       {512, 2, 2, false, false, true},     {512, 2, 2, false, false, true},
                                       {512, 1, 1, false, false, true},     {512, 2, 2, false, false, true},
                                       {512, 2, 2, false, false, true},     {512, 1, 1, false, false, true},
                                       {512, 1, 1, false, false, true},     {512, 2, 2, false, false, true},
                                       {256, 2, 2, false, false, true}};
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

template <typename T, int Threads, int MinBlocks, int Batch = 1, bool kStash = false>
cudaError_t launch_add_rmsnorm_two_pass(const RowArgs& ra, const void* x, void* residual, void* out, int64_t tokens,
                                        cudaStream_t stream) {
  auto* kernel = add_rmsnorm_two_pass_kernel<T, Threads, MinBlocks, Batch, kStash>;
  const int rows_per_cta = Threads / ra.group;
  const int64_t blocks = (tokens + rows_per_cta - 1) / rows_per_cta;
  size_t smem = 0;
  if constexpr (kStash) {
    smem = size_t(rows_per_cta) * size_t(ra.hidden) * sizeof(T);  // <= kStashMaxBytes: add_rmsnorm checked group_of
    // Above 48 KiB (static + dynamic) a kernel must opt in, per device. Once per device, to the most this kernel
    // can use: idempotent, so two host threads racing here set the same value.
    constexpr int kDevices = 64;
    static std::atomic<bool> opted_in[kDevices] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev >= kDevices) return cudaErrorInvalidValue;
    if (!opted_in[dev].load(std::memory_order_relaxed)) {
      int most = 0;
      cudaFuncAttributes fa{};
      cudaError_t e = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, kernel);
      if (e == cudaSuccess && size_t(most) < size_t(kStashMaxBytes) + fa.sharedSizeBytes) e = cudaErrorInvalidValue;
      if (e == cudaSuccess)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most - int(fa.sharedSizeBytes));
      if (e != cudaSuccess) {
        (void)cudaGetLastError();  // not left behind for the caller's next launch check
        return e;
      }
      opted_in[dev].store(true, std::memory_order_relaxed);
    }
  }
  return launch_kernel_smem(kernel, dim3(unsigned(blocks)), dim3(Threads), smem, stream,
                       ra, reinterpret_cast<const Vec*>(x), reinterpret_cast<Vec*>(residual), reinterpret_cast<Vec*>(out),
                       tokens);
}

// 8-byte pieces (add_rmsnorm_pieces_kernel): one row a CTA, two 8-byte pieces per 16-byte vector of its shape's
// target; the kernel always norms, so a weight is required
template <typename T, int Threads, int kPieces, int kOrder, int kCtasPerSm = 1536 / Threads>
cudaError_t launch_add_rmsnorm_pieces(const RowArgs& ra, const void* x, void* residual, void* out, int64_t tokens,
                                      cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (ra.weight == nullptr) return cudaErrorInvalidValue;
    const bool exact = ra.hidden == 4 * kPieces * Threads && residual != nullptr;
    return launch_kernel(exact ? add_rmsnorm_pieces_kernel<T, Threads, kPieces, kOrder, kCtasPerSm, true>
                               : add_rmsnorm_pieces_kernel<T, Threads, kPieces, kOrder, kCtasPerSm, false>,
                         dim3(unsigned(tokens)), dim3(Threads), stream, ra, reinterpret_cast<const uint2*>(x),
                         reinterpret_cast<uint2*>(residual), reinterpret_cast<uint2*>(out), tokens);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t add_rmsnorm_typed(int config, const RowArgs& ra, const void* x, void* residual, void* out,
                              int64_t tokens, cudaStream_t stream) {
  switch (config) {
    // 90 registers in bf16 (2 CTAs an SM); with the weight loaded after the reduction and 48-64 registers (4-6
    // CTAs an SM) it was no faster at 4096-16384 tokens (bench/results/variants/9e7e020)
    case 0:
    case 1: return launch_add_rmsnorm<T, 256, 4, false>(ra, x, residual, out, tokens, stream);
    case 2: return launch_add_rmsnorm<T, 256, 8, false>(ra, x, residual, out, tokens, stream);
    case 3: return launch_add_rmsnorm<T, 512, 8, false>(ra, x, residual, out, tokens, stream);
    case 4: return launch_add_rmsnorm<T, 256, 4, true>(ra, x, residual, out, tokens, stream);
    case 5: return launch_add_rmsnorm<T, 512, 2, true>(ra, x, residual, out, tokens, stream);
    case 6: return launch_add_rmsnorm<T, 1024, 2, false>(ra, x, residual, out, tokens, stream);
    // 512 threads x 2 vectors capped at 32 registers: 4 CTAs (2048 threads) per SM, as the compiled norm runs; it
    // spills (36 bytes in bf16), and without the spill it still trailed (variants/9e7e020, shape 23)
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
    // z kept in shared memory between a read-only and a write-only pass (kStash): 8 x 256, 6 x 256 (two vectors a
    // batch) and 4 x 512 threads per SM, the last the compiled norm's shape (one 256-thread group a row: 2 rows a CTA)
    case 13: return launch_add_rmsnorm_two_pass<T, 256, 8, 1, true>(ra, x, residual, out, tokens, stream);
    case 14: return launch_add_rmsnorm_two_pass<T, 256, 6, 2, true>(ra, x, residual, out, tokens, stream);
    case 15: return launch_add_rmsnorm_two_pass<T, 512, 4, 1, true>(ra, x, residual, out, tokens, stream);
    // 8-byte pieces: 16 and 17 for 8192- and 4096-wide rows; 18 the compiled norm's CTA at 4096 (512 threads,
    // two pieces each); 19-21 the other traffic orders (PiecesOrder), built to find the compiled norm's last 2-4%
    case 16: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesEarly>(ra, x, residual, out, tokens, stream);
    case 17: return launch_add_rmsnorm_pieces<T, 256, 4, kPiecesEarly>(ra, x, residual, out, tokens, stream);
    case 18: return launch_add_rmsnorm_pieces<T, 512, 2, kPiecesEarly>(ra, x, residual, out, tokens, stream);
    case 19: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesLate>(ra, x, residual, out, tokens, stream);
    case 20: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesReread>(ra, x, residual, out, tokens, stream);
    case 21: return launch_add_rmsnorm_pieces<T, 512, 2, kPiecesReread>(ra, x, residual, out, tokens, stream);
    // 16, 20 and 21 capped at 32 registers: 4 CTAs (2048 threads) an SM, as the compiled norm's 29-30-register
    // kernels run; at 512 x 8192 tokens three 512-thread rows an SM leave a second wave of 116 rows
    case 22: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesEarly, 4>(ra, x, residual, out, tokens, stream);
    case 23: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesReread, 4>(ra, x, residual, out, tokens, stream);
    case 24: return launch_add_rmsnorm_pieces<T, 512, 2, kPiecesReread, 4>(ra, x, residual, out, tokens, stream);
    // the re-read in program order, a piece at a time in pass 2 (kPiecesRereadInOrder): families of 18, 16 and 17
    case 25: return launch_add_rmsnorm_pieces<T, 512, 2, kPiecesRereadInOrder, 4>(ra, x, residual, out, tokens, stream);
    case 26: return launch_add_rmsnorm_pieces<T, 512, 4, kPiecesRereadInOrder, 4>(ra, x, residual, out, tokens, stream);
    case 27: return launch_add_rmsnorm_pieces<T, 256, 4, kPiecesRereadInOrder, 8>(ra, x, residual, out, tokens, stream);
  }
  return cudaErrorInvalidValue;
}

static int group_of(int config, int hidden, DType dtype) {
  const NormConfig& g = kNormConfigs[config];
  const int group = plan_row_group(hidden, lanes_of(dtype), g.threads, g.target_vecs, g.max_vecs);
  const int64_t stash_bytes = int64_t(g.threads / (group > 0 ? group : 1)) * hidden * (16 / lanes_of(dtype));
  if (g.pieces && (lanes_of(dtype) != 8 || group != g.threads)) return -1;
  return g.stash && stash_bytes > kStashMaxBytes ? -1 : group;
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

// One of the benchmarks' copy yardsticks (tokenweave.bench.harness.CopyBandwidth): a plain SM copy beside cudaMemcpy
// and torch's elementwise kernel. Each thread keeps kCopyUnroll 16-byte loads in flight before its stores (64 bytes;
// 2048 threads an SM then hold 128 KiB in flight an SM, several times the ~22 KiB that 4.8 TB/s over 132 SMs at
// ~600 ns of DRAM latency asks), grid-stride over the CTAs resident at once (at 34 registers only 6 of 8 fit).
// Measured on one H200 it trails the fastest of the three at every size from 16 MiB to 1 GiB copied (3848 GB/s at
// 256 MiB against cudaMemcpy's 4238; 3895 at 1 GiB against torch's 4098, where cudaMemcpy fell to 2770:
// bench/results/variants/783db04/copy_probe.json), below the norm kernels' 4.2 TB/s: the yardstick takes the fastest.
constexpr int kCopyThreads = 256, kCopyUnroll = 4, kCopyCtasPerSm = 2048 / kCopyThreads;

__global__ void __launch_bounds__(kCopyThreads, kCopyCtasPerSm)
    stream_copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t vecs) {
  const int64_t stride = int64_t(gridDim.x) * kCopyThreads * kCopyUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kCopyThreads * kCopyUnroll + threadIdx.x; base < vecs; base += stride) {
    uint4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kCopyThreads;
      if (i < vecs) v[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kCopyThreads;
      if (i < vecs) dst[i] = v[u];
    }
  }
}

cudaError_t stream_copy(const void* src, void* dst, int64_t bytes, cudaStream_t stream) {
  if (bytes <= 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    return cudaErrorInvalidValue;
  int dev = 0, sms = 0, resident = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, stream_copy_kernel, kCopyThreads, 0);
  if (e != cudaSuccess) return e;
  const int64_t vecs = bytes / 16, per_cta = int64_t(kCopyThreads) * kCopyUnroll;
  const int64_t blocks = std::min<int64_t>((vecs + per_cta - 1) / per_cta, int64_t(sms) * std::max(resident, 1));
  stream_copy_kernel<<<unsigned(blocks), kCopyThreads, 0, stream>>>(static_cast<const uint4*>(src),
                                                                     static_cast<uint4*>(dst), vecs);
  return cudaGetLastError();
}

}  // namespace tokenweave
