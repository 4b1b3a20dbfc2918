// The all-reduce (+ residual + RMSNorm) kernel, written once over the transport policy.
//
// Work is cut into chunks of whole rows; CTA b owns chunks b, b + grid, ... on every rank (the same
// grid on every rank is part of the call signature). Per chunk and phase, each rank's CTA releases one
// flag to every rank, so CTA b only ever waits for the CTAs b of its peers: no grid-wide barrier.
//
// Two-shot (the TokenWeave order), per chunk:
//   A  scatter : piece q of the chunk (1/W of its vectors) goes to rank q      (Tr::stage)
//   B  reduce  : rank q sums its piece over ranks, adds the residual, rounds,
//                and all-gathers the result                                   (Tr::reduce, Tr::broadcast)
//   C  epilogue: residual <- z, out <- RMSNorm(z) * weight for the chunk's rows (local)
// Each CTA pipelines its chunks: A of chunk k+1 is issued before it waits for chunk k.
// Every element is summed exactly once, in rank order, then copied: all ranks get the same bits.
//
// One-shot (small inputs), per chunk: every rank pushes the chunk into its slot on every rank
// (Tr::broadcast), then each rank sums the W slots locally in rank order + residual, and runs C.
// The same numerics as two-shot with P2P: both give bitwise identical results.

#pragma once

#include "tokenweave/common.cuh"
#include "tokenweave/plan.h"
#include "tokenweave/rownorm.cuh"
#include "tokenweave/sync.cuh"
#include "tokenweave/transport.cuh"
#include "call.cuh"
#include "lamport.cuh"
#include "lean.cuh"

#include <type_traits>

namespace tokenweave {

constexpr int kPhaseA = 0;
constexpr int kPhaseB = 1;
// The copy-engine feed's handshake uses the phase-A flag of this chunk (plan_allreduce keeps n_chunks below it).
constexpr int kHandshakeChunk = kMaxChunks - 1;


// z from the all-gathered result in this rank's workspace (two-shot).
struct GatherSource {
  const Vec* gather;
  int nvr;
  __device__ Vec load_z(int64_t row, int j) const { return gather[row * nvr + j]; }
};

// z from the W pushed copies in this rank's slots (one-shot): sum in rank order, + residual, round.
template <typename T, int W>
struct SlotsSource {
  const char* slots;  // slot 0 of this call's half
  uint64_t slot_bytes;
  const Vec* residual;
  int nvr;
  __device__ Vec load_z(int64_t row, int j) const {
    constexpr int L = Pack<T>::kLanes;
    const int64_t idx = row * nvr + j;
    float acc[L];
    sum_slots<T, W>(slots, slot_bytes, idx, acc);
    if (residual) add_vec<T>(acc, residual[idx]);
    return Pack<T>::pack(acc);
  }
};




// kFeed (types.h): kResident is the plain kernel; the other feeds only add code under `if constexpr`, so
// the resident kernel is instruction-for-instruction what it would be without them (CI diffs the SASS).
// kTracked: chunk c is staged only once wait_ready saw its producer pieces land. It keeps the resident
// pipeline order: the reduce and epilogue of earlier chunks run after the wait for the next chunk
// (reordering would shorten the tail after the last GEMM by one pipeline step).
// kCopyEngine: phase A is done by the copy engines (copy_engine_stage); the kernel handshakes once so
// the copies cannot overwrite a slot a peer still reads, then starts each chunk at the reduce.
template <typename T, int W, template <typename, int> class TransportT, Feed kFeed = Feed::kResident>
__global__ void __launch_bounds__(kBlockThreads, 1) allreduce_kernel(const CommDevice c, const CallArgs a) {
  using Tr = TransportT<T, W>;
  constexpr int L = Pack<T>::kLanes;
  constexpr int VPT = kMaxVecsPerThread;
  __shared__ float red[2][kBlockThreads / 32];

  const CallId id = begin_call<T>(c, a);
  const int half = id.epoch & 1;
  const int nvr = a.hidden / L;
  const int n_mine = chunks_of_this_cta(a);
  const Layout& l = c.layout;
  const Vec* x = reinterpret_cast<const Vec*>(a.x);
  const Vec* residual = reinterpret_cast<const Vec*>(a.residual);
  const RowArgs rows = row_args(a);
  const LocalSink local{reinterpret_cast<Vec*>(a.out), reinterpret_cast<Vec*>(a.residual), nvr};
  auto chunk_at = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };
  auto row_begin = [&](int ch) { return int64_t(ch) * a.chunk_rows; };
  auto row_end = [&](int ch) { return min(int64_t(ch + 1) * a.chunk_rows, a.tokens); };
  auto producer_done = [&](int ch) {  // tracked only: wait until the producer finished chunk ch
    return wait_ready(c, a.ready, a.consumed, ch, ch == a.n_chunks - 1 ? a.pieces_last : a.pieces_full, id);
  };

  bool ok = !aborted(c);
  if (ok) publish_call_header(c, a, id.epoch, W);

  if constexpr (kFeed == Feed::kCopyEngine) {
    if (blockIdx.x == 0) {  // every rank has entered this call, so none still reads a staging slot
      if (ok) {
        signal_all<Tr, W>(c, id, kPhaseA, kHandshakeChunk);
        ok = wait_all<W>(c, id, kPhaseA, kHandshakeChunk);
      }
      // Released even after a failure: the copy stream must never wait forever.
      if (threadIdx.x == 0) st_release_sys_u32(a.go, 1u);
    }
  }

  if (ok && a.algo == int(Algo::kOneShot)) {
    char* my_slots = slot_ptr(c.ws[c.rank], l, half, 0);
    const uint64_t my_slot_off = l.data_off + uint64_t(half) * l.half_bytes + uint64_t(c.rank) * l.slot_bytes;
    const SlotsSource<T, W> src{my_slots, l.slot_bytes, (a.op & kOpResidual) ? residual : nullptr, nvr};
    for (int step = 0; step <= n_mine; ++step) {
      if (step < n_mine) {
        const int ch = chunk_at(step);
        if constexpr (kFeed == Feed::kTracked) {
          if (!(ok = producer_done(ch))) break;
        }
        stream_vecs(
            row_begin(ch) * nvr, row_end(ch) * nvr, [&](int64_t i) { return x[i]; },
            [&](int64_t i, const Vec& v) { Tr::broadcast(c, my_slot_off + uint64_t(i) * 16, v); });
        signal_all<Tr, W>(c, id, kPhaseA, ch);
      }
      if (step >= 1) {
        const int ch = chunk_at(step - 1);
        if (!(ok = wait_all<W>(c, id, kPhaseA, ch))) break;
        finish_rows<T, kBlockThreads, VPT, false, RowSync::kGroup>(src, local, rows, row_begin(ch), row_end(ch), red);
      }
    }
  } else if (ok) {
    const GatherSource src{reinterpret_cast<const Vec*>(c.ws[c.rank] + gather_off(l, half)), nvr};
    const uint64_t g_off = gather_off(l, half);
    const int64_t piece_full = (int64_t(a.chunk_rows) * nvr + W - 1) / W;  // slot stride per chunk
    // The copy engines cannot know the epoch's parity (it lives on the GPU): they always stage into half 0.
    // Safe: the handshake above means every peer finished its previous call, reads of half 0 included.
    const int stage_half = kFeed == Feed::kCopyEngine ? 0 : half;
    for (int step = 0; step <= n_mine + 1; ++step) {
      if (kFeed != Feed::kCopyEngine && step < n_mine) {  // A: scatter chunk `step`
        const int ch = chunk_at(step);
        if constexpr (kFeed == Feed::kTracked) {
          if (!(ok = producer_done(ch))) break;
        }
        const int64_t v0 = row_begin(ch) * nvr, nv = (row_end(ch) - row_begin(ch)) * nvr;
        const int64_t piece = (nv + W - 1) / W;
#pragma unroll
        for (int q = 0; q < W; ++q) {
          const int64_t p0 = min(int64_t(q) * piece, nv), p1 = min(p0 + piece, nv);
          const uint64_t slot0 = uint64_t(ch) * piece_full - p0;
          stream_vecs(
              p0, p1, [&](int64_t i) { return x[v0 + i]; },
              [&](int64_t i, const Vec& v) { Tr::stage(c, half, q, slot0 + i, v); });
        }
        signal_all<Tr, W>(c, id, kPhaseA, ch);
      }
      if (step >= 1 && step - 1 < n_mine) {  // B: reduce my piece of chunk step-1, add residual, all-gather
        const int ch = chunk_at(step - 1);
        if constexpr (kFeed == Feed::kCopyEngine) {
          if (!(ok = wait_staged<W>(c, id, ch))) break;
        } else {
          if (!(ok = wait_all<W>(c, id, kPhaseA, ch))) break;
        }
        const int64_t v0 = row_begin(ch) * nvr, nv = (row_end(ch) - row_begin(ch)) * nvr;
        const int64_t piece = (nv + W - 1) / W;
        const int64_t p0 = min(int64_t(c.rank) * piece, nv), p1 = min(p0 + piece, nv);
        const uint64_t slot0 = uint64_t(ch) * piece_full - p0;
        const bool add_res = (a.op & kOpResidual) != 0;
        stream_vecs(
            p0, p1,
            [&](int64_t i) {
              float acc[L];
              Tr::reduce(c, stage_half, slot0 + i, acc);
              if (add_res) {
                float r[L];
                Pack<T>::unpack(residual[v0 + i], r);
#pragma unroll
                for (int k = 0; k < L; ++k) acc[k] += r[k];
              }
              return Pack<T>::pack(acc);
            },
            [&](int64_t i, const Vec& v) { Tr::broadcast(c, g_off + uint64_t(v0 + i) * 16, v); });
        signal_all<Tr, W>(c, id, kPhaseB, ch);
      }
      if (step >= 2) {  // C: epilogue of chunk step-2
        const int ch = chunk_at(step - 2);
        if (!(ok = wait_all<W>(c, id, kPhaseB, ch))) break;
        finish_rows<T, kBlockThreads, VPT, false, RowSync::kGroup>(src, local, rows, row_begin(ch), row_end(ch), red);
      }
    }
  }

  if (!ok) {  // gave up (timeout, mismatch, or an earlier failure): never leave output that looks valid
    for (int i = 0; i < n_mine; ++i)
      poison_rows<T, kBlockThreads>(a.out, a.hidden, row_begin(chunk_at(i)), row_end(chunk_at(i)));
  }
  finish_call(c, id.epoch);
}

// The one switch from the runtime world size to the template parameter: f(std::integral_constant<int, W>).
template <class F>
cudaError_t with_world(int world, const F& f) {
  switch (world) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

// The algorithm picks the kernel; with_world the world size.
template <typename T, template <typename, int> class TransportT, Feed kFeed>
cudaError_t launch_world(const CommDevice& c, const CallArgs& a, cudaStream_t stream) {
  auto go = [&](auto kernel) { return launch_kernel(kernel, dim3(a.ctas), dim3(kBlockThreads), stream, c, a); };
  return with_world(c.world, [&](auto w) -> cudaError_t {
    constexpr int W = decltype(w)::value;
    if (a.algo == int(Algo::kLean)) {  // its own kernel: its register budget is not the other algorithms'
      if constexpr (kFeed == Feed::kResident) return go(lean_kernel<T, W, TransportT>);
      return cudaErrorInvalidValue;
    }
    if (a.algo == int(Algo::kLeanPull)) {
      if constexpr (kFeed == Feed::kResident) return go(lean_pull_kernel<T, W, TransportT>);
      return cudaErrorInvalidValue;
    }
    if (a.algo == int(Algo::kLeanBulk)) {  // workers + a copy warp with its ring of shared-memory stages
      if constexpr (kFeed == Feed::kResident) {
        auto kernel = lean_bulk_kernel<T, W, TransportT>;
        static const cudaError_t smem_ok =  // once per instantiation: the ring is above the 48 KiB default
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kBulkRingBytes));
        if (smem_ok != cudaSuccess) return smem_ok;
        return launch_kernel_smem(kernel, dim3(a.ctas), dim3(kBlockThreads + kCopyWarpThreads), kBulkRingBytes,
                                  stream, c, a);
      }
      return cudaErrorInvalidValue;
    }
    if (a.algo == int(Algo::kLamport)) {  // its own kernel: the flag protocol above has no part in it
      if constexpr (kFeed == Feed::kResident && sizeof(T) == 2) return go(lamport_kernel<T, W, TransportT>);
      return cudaErrorInvalidValue;
    }
    if (a.algo == int(Algo::kLamportTwoShot)) {  // flag-free too (lamport.cuh), with its own registers
      if constexpr (kFeed == Feed::kResident && sizeof(T) == 2) return go(lamport_two_shot_kernel<T, W, TransportT>);
      return cudaErrorInvalidValue;
    }
    return go(allreduce_kernel<T, W, TransportT, kFeed>);
  });
}

// Launches the kernels of one (dtype, transport): the feed, algorithm and world size are dispatched here.
// Tracked calls (a.ready set) are built for the 2-byte types that GEMMs produce, and so is Lamport.
// Each (transport, dtype) is instantiated in a translation unit of its own (allreduce_<transport>_<dtype>.cu,
// the extern declarations below) so that they compile in parallel.
template <typename T, template <typename, int> class TransportT>
cudaError_t launch_typed(const CommDevice& c, const CallArgs& a, cudaStream_t stream) {
  switch (Feed(a.feed)) {
    case Feed::kResident: return launch_world<T, TransportT, Feed::kResident>(c, a, stream);
    case Feed::kTracked:
      if constexpr (sizeof(T) == 2) return launch_world<T, TransportT, Feed::kTracked>(c, a, stream);
      return cudaErrorInvalidValue;
    case Feed::kCopyEngine:
      // The copy engines write peers' unicast slots: a p2p-only feed (multimem stages locally).
      if constexpr (sizeof(T) == 2 && std::is_same_v<TransportT<T, 2>, P2P<T, 2>>)
        return launch_world<T, TransportT, Feed::kCopyEngine>(c, a, stream);
      return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

#define TOKENWEAVE_LAUNCH_TYPED(T, TR) \
  template cudaError_t launch_typed<T, TR>(const CommDevice&, const CallArgs&, cudaStream_t)
extern TOKENWEAVE_LAUNCH_TYPED(__nv_bfloat16, P2P);
extern TOKENWEAVE_LAUNCH_TYPED(__half, P2P);
extern TOKENWEAVE_LAUNCH_TYPED(float, P2P);
extern TOKENWEAVE_LAUNCH_TYPED(__nv_bfloat16, Multimem);
extern TOKENWEAVE_LAUNCH_TYPED(__half, Multimem);
extern TOKENWEAVE_LAUNCH_TYPED(float, Multimem);

// The dtype is dispatched here, once.
template <template <typename, int> class TransportT>
cudaError_t launch_allreduce(const CommDevice& c, const CallArgs& a, cudaStream_t stream) {
  switch (DType(a.dtype)) {
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, TransportT>(c, a, stream);
    case DType::kFloat16: return launch_typed<__half, TransportT>(c, a, stream);
    case DType::kFloat32: return launch_typed<float, TransportT>(c, a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tokenweave
