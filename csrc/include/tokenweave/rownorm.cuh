// Row epilogue shared by every kernel: residual write-back and RMSNorm of whole rows.
//
// A row is handled by a group of G threads (a power of two >= 32, chosen on the host by plan_row_group),
// each keeping up to VPT 16-byte vectors of the row in registers, so the row is read once. Every load a
// thread needs (z's inputs and the weight) is issued before the first use: one memory latency per row,
// not two. The sum of squares is reduced within the group in a fixed order: the result is bitwise
// deterministic and identical on every rank that runs the same code on the same bits.
//
// Where z comes from (Source) and where the results go (Sink) are policies, so the standalone add +
// RMSNorm, the one-shot sum of slots, the two-shot gather and the lean owner's push to every rank share
// this one loop.
#pragma once

#include <cmath>

#include "tokenweave/common.cuh"

namespace tokenweave {

struct RowArgs {
  const void* weight;  // [hidden] or nullptr: no norm, out = z
  int hidden;
  int group;           // threads per row
  float eps;
};

// Host side: threads per row for blocks of `threads`, aiming at `target_vecs` vectors per thread (several
// loads in flight, few registers), at most `max_vecs`. -1: hidden too large.
inline int plan_row_group(int hidden, int lanes, int threads = kBlockThreads, int target_vecs = 4,
                          int max_vecs = kMaxVecsPerThread) {
  const int vecs = hidden / lanes;
  int g = 32;
  while (g < threads && g * target_vecs < vecs) g *= 2;
  return (vecs + g - 1) / g <= max_vecs ? g : -1;
}

// How the threads of a row group meet to sum the row's squares:
//   kCta    __syncthreads(): one barrier per CTA, for kernels that run several CTAs per SM (their CTAs
//           drift apart on their own; a named barrier id chosen at run time makes ptxas reserve all 16
//           of the CTA's barriers, which the occupancy of a many-CTA kernel can be limited by)
//   kGroup  a named barrier per group (1 + group index, G threads; barrier 0 is __syncthreads), for the
//           one-CTA-per-SM collective kernels: a row's reduction never waits for another row's loads, so
//           the groups of a pass drift apart and one group's stores overlap another's loads. Safe for the
//           double buffer: a group's next write to red[p & 1] follows its own barrier of pass p + 1, which
//           each of its threads reaches only after reading pass p's values.
//   kGroupOfWorkers  kGroup in a CTA with a copy warp beside the rows' threads (lean_bulk): the CTA-wide
//           barriers are the workers' (data_sync<true>, common.cuh), never __syncthreads.
// Either way the sum is the same, in the same order.
enum class RowSync { kCta, kGroup, kGroupOfWorkers };
// Barriers 1..14 (15 is the workers' barrier, common.cuh); more groups than that use the CTA-wide barrier.
constexpr int kGroupBarriers = kWorkersBarrier - 1;

// Sum of v over the G threads of each group. `red` is one of two shared buffers, alternated by the
// caller, so a single barrier per pass suffices.
template <RowSync kSync = RowSync::kCta>
__device__ __forceinline__ float group_sum(float v, int G, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (G <= 32) return v;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
  constexpr bool kWorkersOnly = kSync == RowSync::kGroupOfWorkers;
  const int groups = (kWorkersOnly ? kBlockThreads : int(blockDim.x)) / G;
  if (kSync != RowSync::kCta && groups <= kGroupBarriers) {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + int(threadIdx.x) / G), "r"(G) : "memory");
  } else {
    data_sync<kWorkersOnly>();
  }
  const int first = (threadIdx.x / G) * (G / 32);
  float s = 0.f;
  for (int w = 0; w < G / 32; ++w) s += red[first + w];
  return s;
}

template <typename T>
__device__ __forceinline__ Vec nan_vec() {
  constexpr int L = Pack<T>::kLanes;
  float f[L];
#pragma unroll
  for (int i = 0; i < L; ++i) f[i] = __int_as_float(0x7fc00000);
  return Pack<T>::pack(f);
}

// Rows [r0, r1). Source::load_z(row, j) returns vector j of z = round_T(sum + residual) for that row;
// Sink::store_res / store_out write the residual and the output vector. Every thread of the CTA must call
// this with the same arguments (it contains barriers). Threads = blockDim.x; VPT bounds vectors per thread.
// kPrefetchWeight: load the weight with z (one latency per row) at the cost of VPT x 4 more registers; the
// collective kernels, already at their register cap, load it after the reduction instead.
template <typename T, int Threads, int VPT, bool kPrefetchWeight = true, RowSync kSync = RowSync::kCta, class Source,
          class Sink>
__device__ __forceinline__ void finish_rows(const Source& src, const Sink& sink, const RowArgs& a, int64_t r0, int64_t r1,
                            float (&red)[2][Threads / 32]) {
  constexpr int L = Pack<T>::kLanes;
  const int nvr = a.hidden / L;
  const int G = a.group;
  const int rows_per_pass = Threads / G;
  const int lane = threadIdx.x % G;
  const Vec* w = reinterpret_cast<const Vec*>(a.weight);
  int pass = 0;
  for (int64_t base = r0; base < r1; base += rows_per_pass, ++pass) {
    const int64_t row = base + threadIdx.x / G;
    const bool active = row < r1;
    Vec z[VPT], g[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      // Branch-free: a lane with nothing to do here loads a valid vector (row r0, vector 0) and drops it, so
      // the compiler issues every k's loads before the first use. Under `if (active && j < nvr)` each k's
      // loads waited for the previous k's arithmetic: one memory latency per vector (the lean owner spent
      // 72-79% of its cycles in this loop: bench/results/variants/def37c3/lean_phases-h200-tp4.json).
      const int j = lane + k * G;
      const bool mine = active && j < nvr;
      z[k] = src.load_z(mine ? row : r0, mine ? j : 0);
      if (kPrefetchWeight && w) g[k] = w[mine ? j : 0];  // with z's loads: the weight's latency hides behind them
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        sink.store_res(row, j, z[k]);
        float f[L];
        Pack<T>::unpack(z[k], f);
#pragma unroll
        for (int i = 0; i < L; ++i) ss += f[i] * f[i];
      }
    }
    if (w == nullptr) {  // plain all-reduce: out = z
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = lane + k * G;
        if (active && j < nvr) sink.store_out(row, j, z[k]);
      }
      continue;
    }
    const float rstd = rsqrtf(group_sum<kSync>(ss, G, red[pass & 1]) / float(a.hidden) + a.eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        float f[L], gw[L];
        Pack<T>::unpack(z[k], f);
        Pack<T>::unpack(kPrefetchWeight ? g[k] : w[j], gw);
#pragma unroll
        for (int i = 0; i < L; ++i) f[i] = f[i] * rstd * gw[i];
        sink.store_out(row, j, Pack<T>::pack(f));
      }
    }
  }
  data_sync<kSync == RowSync::kGroupOfWorkers>();  // the shared buffers may be reused by the next call
}

// A call that gave up must never leave output that looks valid: NaN into rows [r0, r1) of out.
template <typename T, int Threads>
__device__ void poison_rows(void* out, int hidden, int64_t r0, int64_t r1) {
  const int64_t nvr = hidden / Pack<T>::kLanes;
  Vec* o = reinterpret_cast<Vec*>(out);
  for (int64_t i = r0 * nvr + threadIdx.x; i < r1 * nvr; i += Threads) o[i] = nan_vec<T>();
}

// z = round_T(x + r), or x where there is no residual (has_residual false: r is not read).
template <typename T>
__device__ __forceinline__ Vec add_z(Vec x, Vec r, bool has_residual) {
  if (!has_residual) return x;
  constexpr int L = Pack<T>::kLanes;
  float f[L], g[L];
  Pack<T>::unpack(x, f);
  Pack<T>::unpack(r, g);
#pragma unroll
  for (int i = 0; i < L; ++i) f[i] += g[i];
  return Pack<T>::pack(f);
}

// z = round_T(x + residual): the standalone add + RMSNorm.
template <typename T>
struct LocalSource {
  const Vec* x;
  const Vec* residual;  // nullptr: z = x
  int nvr;
  __device__ Vec load_z(int64_t row, int j) const {
    const Vec v = x[row * nvr + j];
    return residual ? add_z<T>(v, residual[row * nvr + j], true) : v;
  }
};

// Results into this rank's own row-major tensors.
struct LocalSink {
  Vec* out;
  Vec* residual;  // nullptr: not written back
  int nvr;
  __device__ void store_res(int64_t row, int j, const Vec& v) const {
    if (residual) residual[row * nvr + j] = v;
  }
  __device__ void store_out(int64_t row, int j, const Vec& v) const { out[row * nvr + j] = v; }
};

}  // namespace tokenweave
