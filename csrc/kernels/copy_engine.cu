// Track-and-trigger gates made of stream memory operations: nothing waits on an SM.
//
// gate_on_counter (consumer="stream"): the consumer stream waits until counter >= target, then
// re-arms it to 0; the fused kernel of that producer group is launched behind it, so it takes SMs only
// once its rows are complete (as the GEMM's CTAs retire) instead of spinning on them while the GEMM runs.
// Ordering: every producer bump is a gpu-scope release after the group's stores (mark_ready, or the Triton
// epilogue's barrier + atom.add.release), and work behind the wait starts only after the wait observed the
// final count, so it reads the complete rows. All on one GPU: CU_STREAM_WAIT_VALUE_FLUSH (for writes from
// other devices) is not needed.
//
// copy_engine_stage (consumer="copy_engine"): the scatter (phase A of two-shot) runs on the copy engines,
// gated on the producer's progress the same way, so no SM spins or copies for it.
//
// On the copy stream, per producer group g (chunks [g * group_chunks, ...)):
//   cuStreamWaitValue32(group_ready[g] >= pieces)   the GEMM (or its epilogue) finished the group
//   cuStreamWriteValue32(group_ready[g] = 0)        re-arm: a captured wait compares with a constant,
//                                                   so the counter must restart at 0 for the next call/replay
//   per rank q: 2-D copy of piece q of every chunk into rank q's staging slot (half 0, my source slot),
//               then a 4-byte-per-chunk copy of ones into rank q's staged flags
// Stream order completes each copy before the next begins; we rely on that completion covering the
// remote writes, so that a peer that sees the flag sees the data (the GPU tests passed on it; CUDA
// documents a barrier before the write only for cuStreamWriteValue32, the alternative if this ever fails).
// The consumer kernel (Feed::kCopyEngine) acquires the flag, lowers it, and reduces.
// Before the first copy the stream also waits for `go`, raised by the consumer once every rank entered
// this call (nobody still reads staging half 0), and lowers it after the last group.
#include <cuda.h>

#include <mutex>

#include "tokenweave/tokenweave.h"

namespace tokenweave {
namespace {

using WaitValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

struct StreamMemOps {
  WaitValue32 wait = nullptr;
  WriteValue32 write = nullptr;
};

// Driver entry points through the runtime: no link against libcuda. 12000 asks for the CUDA 12 ABI
// of both (the _v2 functions).
const StreamMemOps& stream_mem_ops() {
  static StreamMemOps ops;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      ops.wait = reinterpret_cast<WaitValue32>(p);
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      ops.write = reinterpret_cast<WriteValue32>(p);
  });
  return ops;
}

cudaError_t from_driver(CUresult r) {
  return r == CUDA_SUCCESS ? cudaSuccess : r == CUDA_ERROR_NOT_SUPPORTED ? cudaErrorNotSupported : cudaErrorUnknown;
}

// Wait until *counter >= target, then re-arm: a captured wait compares with a constant, so the counter must
// restart at 0 for the next call or replay. The write is ordered after the wait by the stream.
cudaError_t wait_and_rearm(const StreamMemOps& ops, CUstream s, const uint32_t* counter, uint32_t target) {
  cudaError_t st = from_driver(ops.wait(s, CUdeviceptr(counter), target, CU_STREAM_WAIT_VALUE_GEQ));
  if (st == cudaSuccess) st = from_driver(ops.write(s, CUdeviceptr(counter), 0, CU_STREAM_WRITE_VALUE_DEFAULT));
  return st;
}

}  // namespace

cudaError_t gate_on_counter(uint32_t* counter, uint32_t target, cudaStream_t stream) {
  const StreamMemOps& ops = stream_mem_ops();
  if (ops.wait == nullptr || ops.write == nullptr) return cudaErrorNotSupported;
  if (target < 1) return cudaErrorInvalidValue;
  return wait_and_rearm(ops, reinterpret_cast<CUstream>(stream), counter, target);
}

cudaError_t copy_engine_stage(const CommDevice& c, const CallArgs& a, const uint32_t* group_ready, int group_chunks,
                              uint32_t pieces_full, uint32_t pieces_last, uint32_t* go, const uint32_t* ones,
                              cudaStream_t stream) {
  const StreamMemOps& ops = stream_mem_ops();
  if (ops.wait == nullptr || ops.write == nullptr) return cudaErrorNotSupported;
  if (a.feed != int(Feed::kCopyEngine) || group_chunks < 1) return cudaErrorInvalidValue;
  const CUstream s = reinterpret_cast<CUstream>(stream);
  const Layout& l = c.layout;
  const int W = c.world, me = c.rank, n = a.n_chunks;
  const uint64_t nvr = uint64_t(a.hidden) / lanes_of(DType(a.dtype));
  const uint64_t nv_full = uint64_t(a.chunk_rows) * nvr;
  const uint64_t piece_full = (nv_full + W - 1) / W;  // the kernel's slot stride per chunk
  const uint64_t nv_last = (uint64_t(a.tokens) - uint64_t(n - 1) * a.chunk_rows) * nvr;
  const uint64_t piece_last = (nv_last + W - 1) / W;
  const char* x = static_cast<const char*>(a.x);
  cudaError_t st = from_driver(ops.wait(s, CUdeviceptr(go), 1, CU_STREAM_WAIT_VALUE_GEQ));
  for (int c0 = 0, g = 0; st == cudaSuccess && c0 < n; c0 += group_chunks, ++g) {
    const int c1 = c0 + group_chunks < n ? c0 + group_chunks : n;
    const uint32_t pieces = c1 == n ? pieces_last : pieces_full;
    st = wait_and_rearm(ops, s, group_ready + g, pieces);
    const int full_end = c1 < n - 1 ? c1 : n - 1;  // chunks [c0, full_end) have chunk_rows rows
    for (int i = 1; i <= W && st == cudaSuccess; ++i) {
      const int q = (me + i) % W;  // spread the W senders over different receivers first
      char* slot = c.ws[q] + l.data_off + uint64_t(me) * l.slot_bytes;  // half 0, my source slot
      const uint64_t p0 = uint64_t(q) * piece_full < nv_full ? uint64_t(q) * piece_full : nv_full;
      const uint64_t width = (p0 + piece_full < nv_full ? piece_full : nv_full - p0) * 16;
      if (full_end > c0 && width > 0)
        st = cudaMemcpy2DAsync(slot + uint64_t(c0) * piece_full * 16, piece_full * 16,
                               x + (uint64_t(c0) * nv_full + p0) * 16, nv_full * 16, width, full_end - c0,
                               cudaMemcpyDefault, stream);
      if (st == cudaSuccess && c1 == n) {  // the last chunk, possibly shorter
        const uint64_t l0 = uint64_t(q) * piece_last < nv_last ? uint64_t(q) * piece_last : nv_last;
        const uint64_t bytes = (l0 + piece_last < nv_last ? piece_last : nv_last - l0) * 16;
        if (bytes > 0)
          st = cudaMemcpyAsync(slot + uint64_t(n - 1) * piece_full * 16, x + (uint64_t(n - 1) * nv_full + l0) * 16,
                               bytes, cudaMemcpyDefault, stream);
      }
      if (st == cudaSuccess) {
        uint32_t* flags = reinterpret_cast<uint32_t*>(c.ws[q] + l.staged_off) + me * kMaxChunks + c0;
        st = cudaMemcpyAsync(flags, ones, uint64_t(c1 - c0) * 4, cudaMemcpyDefault, stream);
      }
    }
  }
  if (st == cudaSuccess) st = from_driver(ops.write(s, CUdeviceptr(go), 0, CU_STREAM_WRITE_VALUE_DEFAULT));
  return st;
}

}  // namespace tokenweave
