// The two transports. Kernels are written once against this interface; a transport decides only
// where bytes go and how a sum over ranks is read:
//   stage(c, half, q, slot_vec, v)   two-shot: make my copy of rank q's piece available to rank q
//   stage_ptr(c, half, q)            where stage() puts vector 0 of that piece (lean_bulk's bulk copies)
//   reduce(c, half, slot_vec, acc)   two-shot: fp32 sum over all ranks of my piece
//   broadcast(c, byte_off, v)        store v at byte_off of every rank's workspace (all-gather, one-shot push)
//   store_all(table, byte_off, v)    store v at byte_off of every rank's copy of a symmetric tensor (lean)
//   reduce_own(c, half, slot_vec, own, acc)  lean: fp32 sum over ranks of my rows, my own part given in `own`
//   reduce_all(table, byte_off, acc) lean_pull: fp32 sum over ranks of every rank's copy of a symmetric tensor
//   kStagesOwnPiece                  lean: whether my own rows must be staged too (or are read from x)
//   fence_before_signal()            whatever must precede the flag release after this transport's stores
#pragma once

#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/sync.cuh"

namespace tokenweave {

__device__ __forceinline__ char* slot_ptr(char* base, const Layout& l, int half, int slot) {
  return base + l.data_off + uint64_t(half) * l.half_bytes + uint64_t(slot) * l.slot_bytes;
}

__device__ __forceinline__ uint64_t gather_off(const Layout& l, int half) {
  return l.data_off + uint64_t(half) * l.half_bytes + uint64_t(l.world) * l.slot_bytes;
}

// fp32 sum of W vectors in rank order: the same bits on every rank that sums the same vectors.
template <typename T, int W>
__device__ __forceinline__ void sum_in_rank_order(const Vec (&v)[W], float* acc) {
  constexpr int L = Pack<T>::kLanes;
#pragma unroll
  for (int i = 0; i < L; ++i) acc[i] = 0.f;
#pragma unroll
  for (int s = 0; s < W; ++s) {
    float f[L];
    Pack<T>::unpack(v[s], f);
#pragma unroll
    for (int i = 0; i < L; ++i) acc[i] += f[i];
  }
}

// acc += v (the residual, in fp32).
template <typename T>
__device__ __forceinline__ void add_vec(float* acc, const Vec& v) {
  float f[Pack<T>::kLanes];
  Pack<T>::unpack(v, f);
#pragma unroll
  for (int i = 0; i < Pack<T>::kLanes; ++i) acc[i] += f[i];
}

// fp32 sum of vector `idx` over the W slots starting at `slots` (slot s at s * slot_bytes), in rank
// order. All W loads are issued before the first add.
template <typename T, int W>
__device__ __forceinline__ void sum_slots(const char* slots, uint64_t slot_bytes, uint64_t idx, float* acc) {
  Vec v[W];
#pragma unroll
  for (int s = 0; s < W; ++s) v[s] = reinterpret_cast<const Vec*>(slots + s * slot_bytes)[idx];
  sum_in_rank_order<T, W>(v, acc);
}

// P2P: 16-byte loads and stores through the peer-mapped workspaces. Rank s stages rank q's piece into
// rank q's slot s; rank q then sums its own W slots locally, in rank order (deterministic).
template <typename T, int W>
struct P2P {
  static constexpr bool kStagesOwnPiece = false;  // the owner reads its own rows straight from x

  __device__ static char* stage_ptr(const CommDevice& c, int half, int q) {
    return slot_ptr(c.ws[q], c.layout, half, c.rank);
  }

  __device__ static void stage(const CommDevice& c, int half, int q, uint64_t slot_vec, const Vec& v) {
    reinterpret_cast<Vec*>(stage_ptr(c, half, q))[slot_vec] = v;
  }

  __device__ static void reduce(const CommDevice& c, int half, uint64_t slot_vec, float* acc) {
    sum_slots<T, W>(slot_ptr(c.ws[c.rank], c.layout, half, 0), c.layout.slot_bytes, slot_vec, acc);
  }

  // Slots s != rank hold rank s's copy of my rows; my own part is `own`. Summed in rank order.
  __device__ static void reduce_own(const CommDevice& c, int half, uint64_t slot_vec, const Vec& own, float* acc) {
    const char* slots = slot_ptr(c.ws[c.rank], c.layout, half, 0);
    Vec v[W];
#pragma unroll
    for (int s = 0; s < W; ++s)
      v[s] = s == c.rank ? own : reinterpret_cast<const Vec*>(slots + s * c.layout.slot_bytes)[slot_vec];
    sum_in_rank_order<T, W>(v, acc);
  }

  // Every rank's vector at byte_off of the tensor, read where it lies (W - 1 of them through peer mappings).
  __device__ static void reduce_all(const PeerTable& t, uint64_t byte_off, float* acc) {
    Vec v[W];
#pragma unroll
    for (int q = 0; q < W; ++q) v[q] = *reinterpret_cast<const Vec*>(t.ptr[q] + byte_off);
    sum_in_rank_order<T, W>(v, acc);
  }

  __device__ static void broadcast(const CommDevice& c, uint64_t byte_off, const Vec& v) {
    // Start at the next rank so that the W writers do not all hit rank 0 first.
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int q = (c.rank + 1 + i) % W;
      *reinterpret_cast<Vec*>(c.ws[q] + byte_off) = v;
    }
  }

  // Ranks in index order (a rotation by rank would index the table at run time: a local-memory copy).
  __device__ static void store_all(const CommDevice&, const PeerTable& t, uint64_t byte_off, const Vec& v) {
#pragma unroll
    for (int q = 0; q < W; ++q) *reinterpret_cast<Vec*>(t.ptr[q] + byte_off) = v;
  }

  __device__ static void fence_before_signal() {}
};

// Multimem (Hopper NVLink SHARP): one multimem.ld_reduce returns the sum over all ranks and one
// multimem.st writes every rank, through the multicast address c.mc of the same workspace.
// Rank s stages rank q's piece into its own slot q; rank q reduces slot q through the multicast address.
// The switch accumulates bf16/fp16 in fp32 (.acc::f32) but returns the sum rounded to T.
template <typename T>
struct MultimemOps;

template <>
struct MultimemOps<__nv_bfloat16> {
  __device__ static Vec ld_reduce(const void* p) {
    Vec v;
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
  }
};

template <>
struct MultimemOps<__half> {
  __device__ static Vec ld_reduce(const void* p) {
    Vec v;
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
  }
};

template <>
struct MultimemOps<float> {
  __device__ static Vec ld_reduce(const void* p) {
    Vec v;
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
  }
};

template <typename T, int W>
struct Multimem {
  static constexpr bool kStagesOwnPiece = true;  // the switch sums every rank's slot, mine included

  __device__ static char* stage_ptr(const CommDevice& c, int half, int q) {
    return slot_ptr(c.ws[c.rank], c.layout, half, q);
  }

  __device__ static void stage(const CommDevice& c, int half, int q, uint64_t slot_vec, const Vec& v) {
    reinterpret_cast<Vec*>(stage_ptr(c, half, q))[slot_vec] = v;
  }

  __device__ static void reduce(const CommDevice& c, int half, uint64_t slot_vec, float* acc) {
    const Vec* p = reinterpret_cast<const Vec*>(slot_ptr(c.mc, c.layout, half, c.rank)) + slot_vec;
    Pack<T>::unpack(MultimemOps<T>::ld_reduce(p), acc);
  }

  __device__ static void reduce_own(const CommDevice& c, int half, uint64_t slot_vec, const Vec&, float* acc) {
    reduce(c, half, slot_vec, acc);
  }

  __device__ static void reduce_all(const PeerTable& t, uint64_t byte_off, float* acc) {
    Pack<T>::unpack(MultimemOps<T>::ld_reduce(t.mc + byte_off), acc);
  }

  __device__ static void multicast_store(char* mc_addr, const Vec& v) {
    asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(mc_addr), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
  }

  __device__ static void broadcast(const CommDevice& c, uint64_t byte_off, const Vec& v) {
    multicast_store(c.mc + byte_off, v);
  }

  __device__ static void store_all(const CommDevice&, const PeerTable& t, uint64_t byte_off, const Vec& v) {
    multicast_store(t.mc + byte_off, v);
  }

  // Peers read what we wrote through the multicast alias via their unicast mapping: order the alias
  // proxy before the flag release.
  __device__ static void fence_before_signal() { asm volatile("fence.proxy.alias;" ::: "memory"); }
};

}  // namespace tokenweave
