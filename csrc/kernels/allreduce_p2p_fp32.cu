// P2P kernels for float. Run on the GPU hosts (tests, emulated world).
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(float, P2P);
}  // namespace tokenweave
