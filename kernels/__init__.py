"""Native fused similarity/top-k kernels (no torch).

``topk(queries, gallery, k)`` returns the exact top-k rows of ``gallery`` by inner product
for every query, in one pass over the gallery, without materialising the Q x N scores.
"""

from clapedge.kernels.topk import topk

__all__ = ["topk"]
