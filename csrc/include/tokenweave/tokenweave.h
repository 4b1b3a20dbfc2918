// Public torch-free entry points: raw pointers and a stream in, cudaError_t out.
#pragma once

#include <cuda_runtime.h>

#include "tokenweave/plan.h"
#include "tokenweave/types.h"

namespace tokenweave {

// All-reduce of x over the communicator, then (per OpBits) residual add and RMSNorm, in one kernel.
// `a` must come from plan_allreduce. Transport::kMultimem requires c.mc != nullptr.
cudaError_t allreduce(const CommDevice& c, const CallArgs& a, Transport t, cudaStream_t stream);

// out = RMSNorm(x + residual) * weight; residual <- x + residual. No communication.
cudaError_t add_rmsnorm(const void* x, void* residual, const void* weight, void* out, int64_t tokens, int hidden,
                        float eps, DType dtype, cudaStream_t stream);

// Peer-access check: writes `magic + (rank << 8) + q` into rank q's probe slot `rank` for every q, and
// reads back what every rank q holds in its slot `rank` into result[q] (remote read after remote write).
cudaError_t peer_probe(const CommDevice& c, uint64_t magic, uint64_t* result, cudaStream_t stream);

}  // namespace tokenweave
