// Multimem instantiations. Compiled and disassembled in CI; never run on hosts where multicast is off.
#include "allreduce.cuh"

namespace tokenweave {
cudaError_t launch_allreduce_multimem(const CommDevice& c, const CallArgs& a, cudaStream_t s) {
  return launch_allreduce<Multimem>(c, a, s);
}
}  // namespace tokenweave
