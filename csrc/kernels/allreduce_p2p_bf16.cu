// P2P kernels for __nv_bfloat16. Run on the GPU hosts (tests, emulated world).
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(__nv_bfloat16, P2P);
}  // namespace tokenweave
