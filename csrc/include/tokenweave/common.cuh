// 16-byte vector packing (device side). Accumulation is always fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tokenweave/types.h"

namespace tokenweave {

// Converts one 16-byte vector of T to and from fp32 lanes. Accumulation is always fp32.
// 2-byte types go through their packed pair type; Half2<T> names it and its two conversions.
// unpack takes the vector by value: given a reference into global memory (unpack(residual[i], f)), the
// 2-byte types' pair-by-pair reads compiled to four 4-byte loads instead of one 16-byte load (sm_90a SASS:
// LDG.E x 4), a quarter of the bytes per load instruction on the norm's and the collectives' hot loads.
template <typename T> struct Half2;

template <> struct Half2<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  __device__ static float2 to_float2(Pair p) { return __bfloat1622float2(p); }
  __device__ static Pair from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <> struct Half2<__half> {
  using Pair = __half2;
  __device__ static float2 to_float2(Pair p) { return __half22float2(p); }
  __device__ static Pair from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};

template <typename T> struct Pack {
  static constexpr int kLanes = 8;
  using H = Half2<T>;
  __device__ static void unpack(Vec v, float* f) {
    const typename H::Pair* p = reinterpret_cast<const typename H::Pair*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = H::to_float2(p[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static Vec pack(const float* f) {
    Vec v;
    typename H::Pair* p = reinterpret_cast<typename H::Pair*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = H::from_floats(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

template <> struct Pack<float> {
  static constexpr int kLanes = 4;
  __device__ static void unpack(Vec v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ static Vec pack(const float* f) {
    return Vec{__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3])};
  }
};

// The CTA-wide barrier of the threads that run a kernel's data path. In every kernel but lean_bulk those are
// all of the CTA's threads (__syncthreads). lean_bulk adds a copy warp that never joins them (it would wait
// behind its own bulk copies), so there the kBlockThreads workers meet on named barrier kWorkersBarrier
// instead; barriers 1 .. kWorkersBarrier - 1 are the row groups' (rownorm.cuh).
constexpr int kWorkersBarrier = 15;

template <bool kWorkersOnly>
__device__ __forceinline__ void data_sync() {
  if constexpr (kWorkersOnly) {
    asm volatile("bar.sync %0, %1;" ::"n"(kWorkersBarrier), "n"(kBlockThreads) : "memory");
  } else {
    __syncthreads();
  }
}

// data_sync() that also returns whether v held on every participating thread.
template <bool kWorkersOnly>
__device__ __forceinline__ bool data_sync_and(bool v) {
  if constexpr (kWorkersOnly) {
    uint32_t all;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.and.pred p, %2, %3, q;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(all)
        : "r"(uint32_t(v)), "n"(kWorkersBarrier), "n"(kBlockThreads)
        : "memory");
    return all != 0;
  } else {
    return __syncthreads_and(v) != 0;
  }
}

}  // namespace tokenweave
