// Multimem kernels for __half. Compiled and disassembled in CI; never run on hosts where multicast is off.
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(__half, Multimem);
}  // namespace tokenweave
