// P2P kernels for __half. Run on the GPU hosts (tests, emulated world).
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(__half, P2P);
}  // namespace tokenweave
