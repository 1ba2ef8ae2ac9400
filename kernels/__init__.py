"""Native fused similarity/top-k kernels (no torch).

``topk(queries, gallery, k)`` returns the top-k rows of ``gallery`` by inner product for every
query, in one pass over the gallery, without materialising the Q x N scores. ``gallery`` is a
float32/float16 numpy array (exact) or a ``Gallery`` (int8 with exact re-rank, fp16, float32)
that can be saved and memory-mapped. The SIMD code path is picked at import (see ``simd``).
"""

from clapedge.kernels import _native
from clapedge.kernels.errors import GalleryFileError, KernelInputError
from clapedge.kernels.gallery import Gallery, quantize_int8
from clapedge.kernels.simd import (available_simd_levels, best_simd_level, set_simd_level,
                                   simd_level)
from clapedge.kernels.simd import _log_choice
from clapedge.kernels.topk import topk


def cuda_available() -> bool:
    """clapedge was built with CLAPEDGE_CUDA=ON and a GPU is visible."""
    return bool(_native.cuda_available())


_log_choice()

__all__ = [
    "Gallery",
    "GalleryFileError",
    "KernelInputError",
    "available_simd_levels",
    "best_simd_level",
    "cuda_available",
    "quantize_int8",
    "set_simd_level",
    "simd_level",
    "topk",
]
