// P2P instantiations (kept apart from multimem so the two compile in parallel).
#include "allreduce.cuh"

namespace tokenweave {
cudaError_t launch_allreduce_p2p(const CommDevice& c, const CallArgs& a, cudaStream_t s) {
  return launch_allreduce<P2P>(c, a, s);
}
}  // namespace tokenweave
