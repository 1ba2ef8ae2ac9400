// CUDA variant of the first pass of the fused similarity/top-k kernel (topk.cc does the
// shape checks, the int8 query quantisation and the re-rank, shared with the CPU path).
// Built only with -DCLAPEDGE_CUDA=ON (defines CLAPEDGE_HAVE_CUDA).
#pragma once

#include <cstdint>
#include <vector>

#include "topk.h"
#include "topk_cpu.h"

namespace clapedge {
namespace cuda {

// Number of visible CUDA devices (0 when there is no driver or no device).
int device_count();

// The best `keep` candidates of every query (best first), like the CPU first pass: one thread
// block scores one gallery tile for one query and selects the tile's top `keep` with a warp,
// then one warp per query merges the tiles' candidates. Inputs are host pointers (copied to the
// device on each call). Int8 galleries use `qcodes` (signed, [Q, padded_dim]) and `qscales`.
std::vector<std::vector<cpu::Candidate>> first_pass(const TopKParams& p, const int8_t* qcodes,
                                                    const float* qscales, int64_t keep,
                                                    const std::vector<float>& floors);

}  // namespace cuda
}  // namespace clapedge
