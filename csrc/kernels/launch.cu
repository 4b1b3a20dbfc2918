// Torch-free launchers: planning, transport dispatch, the standalone add + RMSNorm, the peer probe.
#include "tokenweave/rownorm.cuh"
#include "tokenweave/tokenweave.h"

namespace tokenweave {

cudaError_t launch_allreduce_p2p(const CommDevice& c, const CallArgs& a, cudaStream_t s);
cudaError_t launch_allreduce_multimem(const CommDevice& c, const CallArgs& a, cudaStream_t s);

const char* plan_allreduce(CallArgs& a, const Layout& l, int ctas, int chunks_per_cta) {
  const int lanes = lanes_of(DType(a.dtype));
  const uint64_t elem = 16 / lanes;
  if (a.tokens < 1) return "tokens must be >= 1";
  if (a.hidden % 8 != 0) return "hidden must be a multiple of 8 (16-byte vectors)";
  a.group = plan_row_group(a.hidden, lanes);
  if (a.group < 0) return "hidden is too large for the row epilogue (at most 32768 for 2-byte types, 16384 for float32)";
  if (ctas < 1 || chunks_per_cta < 1) return "ctas and chunks_per_cta must be >= 1";
  const uint64_t bytes = uint64_t(a.tokens) * a.hidden * elem;
  if (bytes > l.capacity_bytes) return "x is larger than the workspace: make the Communicator with a larger max_tokens";
  if (a.algo == int(Algo::kOneShot) && bytes > l.slot_bytes - uint64_t(kMaxChunks) * 16 - 16)
    return "x is too large for one-shot (limit: workspace capacity / world): use two-shot";
  if (a.algo != int(Algo::kOneShot) && a.algo != int(Algo::kTwoShot)) return "algo must be one-shot or two-shot";
  int64_t rows = (a.tokens + int64_t(ctas) * chunks_per_cta - 1) / (int64_t(ctas) * chunks_per_cta);
  rows = rows < 1 ? 1 : rows;
  if ((a.tokens + rows - 1) / rows > kMaxChunks) rows = (a.tokens + kMaxChunks - 1) / kMaxChunks;
  a.chunk_rows = int(rows);
  a.n_chunks = int((a.tokens + rows - 1) / rows);
  a.ctas = ctas < a.n_chunks ? ctas : a.n_chunks;
  if (a.algo == int(Algo::kTwoShot)) {
    const uint64_t nvr = a.hidden / lanes;
    // Chunk c's piece sits at c * piece_full in every slot; only the last chunk is shorter.
    const uint64_t piece_full = (uint64_t(a.chunk_rows) * nvr + l.world - 1) / l.world;
    const uint64_t last_rows = uint64_t(a.tokens) - uint64_t(a.n_chunks - 1) * a.chunk_rows;
    const uint64_t piece_last = (last_rows * nvr + l.world - 1) / l.world;
    if ((uint64_t(a.n_chunks - 1) * piece_full + piece_last) * 16 > l.slot_bytes) return "internal: two-shot slots overflow";
  }
  if (a.feed == int(Feed::kCopyEngine) && (a.algo != int(Algo::kTwoShot) || a.n_chunks >= kMaxChunks))
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

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) add_rmsnorm_kernel(RowArgs ra, const Vec* x, int64_t tokens) {
  __shared__ float red[2][kBlockThreads / 32];
  const int rows_per_pass = kBlockThreads / ra.group;
  const LocalSource<T> src{x, reinterpret_cast<const Vec*>(ra.residual), ra.hidden / Pack<T>::kLanes};
  for (int64_t r0 = int64_t(blockIdx.x) * rows_per_pass; r0 < tokens; r0 += int64_t(gridDim.x) * rows_per_pass)
    finish_rows<T>(src, ra, r0, min(r0 + rows_per_pass, tokens), false, red);
}

cudaError_t add_rmsnorm(const void* x, void* residual, const void* weight, void* out, int64_t tokens, int hidden,
                        float eps, DType dtype, cudaStream_t stream) {
  const int group = plan_row_group(hidden, lanes_of(dtype));
  if (group < 0 || hidden % 8 != 0 || tokens < 1) return cudaErrorInvalidValue;
  const RowArgs ra{out, residual, weight, hidden, group, eps};
  const int rows_per_pass = kBlockThreads / group;
  int64_t blocks = (tokens + rows_per_pass - 1) / rows_per_pass;
  // Enough CTAs to fill every SM several times over; more only adds scheduling cost.
  blocks = blocks > 1024 ? 1024 : blocks;
  const Vec* xv = reinterpret_cast<const Vec*>(x);
  switch (dtype) {
    case DType::kBFloat16: add_rmsnorm_kernel<__nv_bfloat16><<<blocks, kBlockThreads, 0, stream>>>(ra, xv, tokens); break;
    case DType::kFloat16: add_rmsnorm_kernel<__half><<<blocks, kBlockThreads, 0, stream>>>(ra, xv, tokens); break;
    case DType::kFloat32: add_rmsnorm_kernel<float><<<blocks, kBlockThreads, 0, stream>>>(ra, xv, tokens); break;
  }
  return cudaGetLastError();
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
