// NEON level with the int8 dot-product instructions (ARMv8.2 SDOT; Cortex-A76/A78 and later,
// Jetson Orin's Cortex-A78AE): see topk_cpu_neon_impl.h. Compiled with
// -march=armv8.2-a+dotprod; topk.cc checks HWCAP_ASIMDDP before calling it.
#ifndef __ARM_FEATURE_DOTPROD
#error "compile this file with -march=armv8.2-a+dotprod"
#endif
#define CLAPEDGE_NEON_DOTPROD 1
#include "topk_cpu_neon_impl.h"

namespace clapedge {
namespace cpu {

const LevelKernels* neon_dotprod_kernels() { return &kLevel; }

}  // namespace cpu
}  // namespace clapedge
