// Plain NEON level (every AArch64 CPU): see topk_cpu_neon_impl.h.
#include "topk_cpu_neon_impl.h"

namespace clapedge {
namespace cpu {

const LevelKernels* neon_kernels() { return &kLevel; }

}  // namespace cpu
}  // namespace clapedge
