// Multimem kernels for __nv_bfloat16. Compiled and disassembled in CI; never run on hosts where multicast is off.
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(__nv_bfloat16, Multimem);
}  // namespace tokenweave
