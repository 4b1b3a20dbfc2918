// Public torch-free entry points: raw pointers and a stream in, cudaError_t out.
#pragma once

#include <cuda_runtime.h>

#include "tokenweave/plan.h"
#include "tokenweave/types.h"

namespace tokenweave {

// All-reduce of x over the communicator, then (per OpBits) residual add and RMSNorm, in one kernel.
// `a` must come from plan_allreduce. Transport::kMultimem requires c.mc != nullptr. With a.ready set
// (track-and-trigger, bf16/fp16 only) chunk c is read only once its producer marked it.
cudaError_t allreduce(const CommDevice& c, const CallArgs& a, Transport t, cudaStream_t stream);

// out = RMSNorm(x + residual) * weight; residual <- x + residual. No communication.
// `config` picks the block shape (kNormConfigs in launch.cu, add_rmsnorm_configs() of them; 0 = the kernel's
// own pick). The Python dispatcher passes the shape the card's config names for the size (tuning.norm_shape).
cudaError_t add_rmsnorm(const void* x, void* residual, const void* weight, void* out, int64_t tokens, int hidden,
                        float eps, DType dtype, cudaStream_t stream, int config = 0);
int add_rmsnorm_configs();
// Threads per row (row group) of shape `config` at this hidden, -1 where the shape cannot hold the row. The group
// fixes the order a row's squares are summed in: 16-byte shapes with equal groups give the same bits (shape 16
// reads 8-byte pieces: another order than a 16-byte shape with its group).
int add_rmsnorm_row_group(int config, int hidden, DType dtype);

// Programmatic dependent launch (pdl.cuh), process-wide, off by default: when on, every kernel above is
// launched so that it may start while the previous kernel in its stream finishes.
void set_programmatic_launch(bool on);
bool programmatic_launch();

// Track-and-trigger producer side: ready[c] += pieces for c in [begin, end), with release at gpu scope,
// after whatever the stream ran before (the GEMM that wrote those chunks).
cudaError_t mark_ready(uint32_t* ready, int begin, int end, uint32_t pieces, cudaStream_t stream);

// One of the benchmarks' copy yardsticks: bytes from src to dst in 16-byte vectors on every SM. bytes and both
// pointers must be multiples of 16.
cudaError_t stream_copy(const void* src, void* dst, int64_t bytes, cudaStream_t stream);

// Stream gate of track-and-trigger (consumer="stream"): `stream` waits until *counter >= target, then
// sets it to 0 (re-armed for the next call or graph replay); work enqueued after it starts only then.
// No SM waits. cudaErrorNotSupported where the driver lacks stream memory operations.
cudaError_t gate_on_counter(uint32_t* counter, uint32_t target, cudaStream_t stream);

// Copy-engine feed (p2p, two-shot, a.feed == Feed::kCopyEngine, `a` planned like the consumer's call):
// enqueues on `stream` the gated scatter of x (see copy_engine.cu). Producer group g covers chunks
// [g * group_chunks, ...) and is complete when group_ready[g] >= pieces_full (pieces_last for the last
// group); counters restart at 0. `go` is the consumer's handshake word; `ones` holds >= kMaxChunks ones.
// cudaErrorNotSupported where the driver lacks stream memory operations.
cudaError_t copy_engine_stage(const CommDevice& c, const CallArgs& a, const uint32_t* group_ready, int group_chunks,
                              uint32_t pieces_full, uint32_t pieces_last, uint32_t* go, const uint32_t* ones,
                              cudaStream_t stream);

// Peer-access check: writes `magic + (rank << 8) + q` into rank q's probe slot `rank` for every q, and
// reads back what every rank q holds in its slot `rank` into result[q] (remote read after remote write).
cudaError_t peer_probe(const CommDevice& c, uint64_t magic, uint64_t* result, cudaStream_t stream);

}  // namespace tokenweave
