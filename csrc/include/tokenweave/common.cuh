// 16-byte vector packing (device side). Accumulation is always fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tokenweave/types.h"

namespace tokenweave {

// Converts one 16-byte vector of T to and from fp32 lanes. Accumulation is always fp32.
template <typename T> struct Pack;

template <> struct Pack<__nv_bfloat16> {
  static constexpr int kLanes = 8;
  __device__ static void unpack(const Vec& v, float* f) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 t = __bfloat1622float2(p[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static Vec pack(const float* f) {
    Vec v;
    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

template <> struct Pack<__half> {
  static constexpr int kLanes = 8;
  __device__ static void unpack(const Vec& v, float* f) {
    const __half2* p = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 t = __half22float2(p[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static Vec pack(const float* f) {
    Vec v;
    __half2* p = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

template <> struct Pack<float> {
  static constexpr int kLanes = 4;
  __device__ static void unpack(const Vec& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ static Vec pack(const float* f) {
    return Vec{__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3])};
  }
};

}  // namespace tokenweave
