// Multimem kernels for float. Compiled and disassembled in CI; never run on hosts where multicast is off.
#include "allreduce.cuh"

namespace tokenweave {
TOKENWEAVE_LAUNCH_TYPED(float, Multimem);
}  // namespace tokenweave
