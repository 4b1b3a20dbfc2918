// Row epilogue shared by every kernel: residual write-back and RMSNorm of whole rows.
//
// A row is handled by a group of G threads (a power of two >= 32, chosen on the host by plan_rows),
// each keeping up to kMaxVecsPerThread 16-byte vectors of the row in registers, so the row is read
// once. The sum of squares is reduced within the group in a fixed order: the result is bitwise
// deterministic and identical on every rank that runs the same code on the same bits.
#pragma once

#include <cmath>

#include "tokenweave/common.cuh"

namespace tokenweave {

struct RowArgs {
  void* out;             // [tokens, hidden]
  void* residual;        // [tokens, hidden] or nullptr: receives z
  const void* weight;    // [hidden] or nullptr: no norm, out = z
  int hidden;
  int group;             // threads per row
  float eps;
};

// Host side: threads per row. Aim for 4 vectors per thread (several loads in flight, few registers).
inline int plan_row_group(int hidden, int lanes) {
  const int vecs = hidden / lanes;
  int g = 32;
  while (g < kBlockThreads && g * 4 < vecs) g *= 2;
  return (vecs + g - 1) / g <= kMaxVecsPerThread ? g : -1;  // -1: hidden too large
}

// Sum of v over the G threads of each group. `red` is one of two shared buffers, alternated by the
// caller, so a single barrier per pass suffices.
__device__ __forceinline__ float group_sum(float v, int G, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (G <= 32) return v;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
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

// Rows [r0, r1). Source::load_z(row, j) returns vector j of z = round_T(sum + residual) for that row.
// poison: write NaN to out instead (a call that gave up must never look valid).
// Every thread of the CTA must call this with the same arguments (it contains barriers).
template <typename T, class Source>
__device__ void finish_rows(const Source& src, const RowArgs& a, int64_t r0, int64_t r1, bool poison,
                            float (&red)[2][kBlockThreads / 32]) {
  constexpr int L = Pack<T>::kLanes;
  const int nvr = a.hidden / L;
  const int G = a.group;
  const int rows_per_pass = kBlockThreads / G;
  const int lane = threadIdx.x % G;
  Vec* out = reinterpret_cast<Vec*>(a.out);
  Vec* res = reinterpret_cast<Vec*>(a.residual);
  const Vec* w = reinterpret_cast<const Vec*>(a.weight);
  int pass = 0;
  for (int64_t base = r0; base < r1; base += rows_per_pass, ++pass) {
    const int64_t row = base + threadIdx.x / G;
    const bool active = row < r1;
    const int64_t row_off = row * nvr;
    if (poison) {
#pragma unroll
      for (int k = 0; k < kMaxVecsPerThread; ++k) {
        const int j = lane + k * G;
        if (active && j < nvr) out[row_off + j] = nan_vec<T>();
      }
      continue;
    }
    Vec z[kMaxVecsPerThread];
#pragma unroll
    for (int k = 0; k < kMaxVecsPerThread; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) z[k] = src.load_z(row, j);
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxVecsPerThread; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        if (res) res[row_off + j] = z[k];
        float f[L];
        Pack<T>::unpack(z[k], f);
#pragma unroll
        for (int i = 0; i < L; ++i) ss += f[i] * f[i];
      }
    }
    if (w == nullptr) {  // plain all-reduce: out = z
#pragma unroll
      for (int k = 0; k < kMaxVecsPerThread; ++k) {
        const int j = lane + k * G;
        if (active && j < nvr) out[row_off + j] = z[k];
      }
      continue;
    }
    const float rstd = rsqrtf(group_sum(ss, G, red[pass & 1]) / float(a.hidden) + a.eps);
#pragma unroll
    for (int k = 0; k < kMaxVecsPerThread; ++k) {
      const int j = lane + k * G;
      if (active && j < nvr) {
        float f[L], g[L];
        Pack<T>::unpack(z[k], f);
        Pack<T>::unpack(w[j], g);
#pragma unroll
        for (int i = 0; i < L; ++i) f[i] = f[i] * rstd * g[i];
        out[row_off + j] = Pack<T>::pack(f);
      }
    }
  }
  __syncthreads();  // the shared buffers may be reused by the next call
}

// z = round_T(x + residual): the standalone add + RMSNorm.
template <typename T>
struct LocalSource {
  const Vec* x;
  const Vec* residual;  // nullptr: z = x
  int nvr;
  __device__ Vec load_z(int64_t row, int j) const {
    const Vec v = x[row * nvr + j];
    if (residual == nullptr) return v;
    constexpr int L = Pack<T>::kLanes;
    float f[L], r[L];
    Pack<T>::unpack(v, f);
    Pack<T>::unpack(residual[row * nvr + j], r);
#pragma unroll
    for (int i = 0; i < L; ++i) f[i] += r[i];
    return Pack<T>::pack(f);
  }
};

}  // namespace tokenweave
