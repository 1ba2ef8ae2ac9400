"""Python twin of the native ``topk`` kernel (faiss ``knn`` style: one function)."""

from __future__ import annotations

import numpy as np

from clapedge.kernels import _native
from clapedge.kernels.errors import KernelInputError
from clapedge.kernels.gallery import Gallery, first_non_finite_row, float_rows
from clapedge.kernels.simd import simd_level


def topk(
    queries: np.ndarray,
    gallery: np.ndarray | Gallery,
    k: int,
    *,
    threads: int = 0,
    allow: np.ndarray | None = None,
    min_score: np.ndarray | float | None = None,
    rerank_factor: int = 4,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows by inner product (cosine for normalised embeddings), per query, in
    one pass over the gallery without materialising the Q x N scores.

    Args:
        queries: [Q, D] (or [D]) query vectors. Converted to contiguous float32 (they are small).
        gallery: a ``Gallery`` (int8 / fp16 / float32 storage), or a numpy array [N, D]:
            float32 is scanned exactly and in place (no copy when C-contiguous), float16 in place
            as an fp16 gallery, other real dtypes are converted to float32 (one copy); complex,
            bool and object arrays are refused.
        k: results per query (> 0). With fewer than k qualifying rows the tail is padded with
            id -1 and score -inf.
        threads: worker threads (0 or less: all cores); the gallery is split across them, so a
            single query uses them all.
        allow: optional allow-list: a boolean mask [N], or an integer array of row ids.
        min_score: optional minimum score, one float or one per query.
        rerank_factor: for a Gallery with a re-rank copy, how many candidates per result the
            first pass keeps (k' = rerank_factor * k) to re-score exactly; 0 disables re-rank.
        device: "cpu", or "cuda" when clapedge was built with CLAPEDGE_CUDA=ON and a GPU exists.

    Returns:
        (scores float32 [Q, k], ids int64 [Q, k]), sorted by score descending, ties by lower id.
        int8 galleries without re-rank return the dequantised int8 scores; with re-rank, the
        exact scores of the re-rank copy.

    Raises:
        KernelInputError (a ValueError) naming what is wrong: shapes, dtypes, NaN/Inf, k,
        filters.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise KernelInputError(f"k must be a positive integer, got {k!r}")
    if isinstance(rerank_factor, bool) or not isinstance(rerank_factor, (int, np.integer)) \
            or rerank_factor < 0:
        raise KernelInputError(f"rerank_factor must be an integer >= 0, got {rerank_factor!r}")
    q = np.asarray(queries)
    q = float_rows(q[None, :] if q.ndim == 1 else q, "queries")
    bad = first_non_finite_row(q)
    if bad is not None:
        raise KernelInputError(f"queries contain NaN or Inf (first at row {bad})")

    if isinstance(gallery, Gallery):
        args = gallery._native_args()
        n, dim = gallery.shape
        if not rerank_factor:
            args["rerank"] = None
    else:
        args, n, dim = _array_gallery(gallery)
    if n and q.shape[1] != dim:
        raise KernelInputError(
            f"queries have dim {q.shape[1]} but the gallery has dim {dim}; they must match")
    if n == 0:  # an empty gallery of any dim gives empty results
        args, _, _ = _array_gallery(np.zeros((0, q.shape[1]), np.float32))

    scores = np.empty((q.shape[0], int(k)), dtype=np.float32)
    ids = np.empty((q.shape[0], int(k)), dtype=np.int64)
    try:
        _native.topk(q, **args, rerank_factor=int(max(rerank_factor, 1)), k=int(k),
                     threads=int(threads), allow=_allow_bits(allow, n),
                     min_score=_thresholds(min_score, q.shape[0]), simd=simd_level(),
                     device=_check_device(device), out_scores=scores, out_ids=ids)
    except ValueError as e:
        if "not finite" in str(e):
            raise KernelInputError(_describe_non_finite(gallery)) from None
        raise KernelInputError(str(e)) from None
    return scores, ids


def _array_gallery(gallery: np.ndarray) -> tuple[dict, int, int]:
    g = np.asarray(gallery)
    if g.dtype == np.float16 and g.ndim == 2 and g.flags.c_contiguous and g.shape[1] > 0:
        dtype, vectors = "fp16", g.view(np.uint16)
    else:
        dtype, vectors = "float32", float_rows(g, "gallery")
    args = dict(vectors=vectors, dtype=dtype, num_vectors=g.shape[0], scales=None,
                corrections=None, rerank=None, rerank_dtype="float32")
    return args, g.shape[0], g.shape[1]


def _allow_bits(allow: np.ndarray | None, n: int) -> np.ndarray | None:
    if allow is None:
        return None
    mask = np.asarray(allow)
    if mask.dtype == np.bool_:
        if mask.shape != (n,):
            raise KernelInputError(
                f"allow as a boolean mask must have shape ({n},), got {mask.shape}")
    elif np.issubdtype(mask.dtype, np.integer) and mask.ndim == 1:
        if mask.size and (mask.min() < 0 or mask.max() >= n):
            raise KernelInputError(f"allow holds row ids outside [0, {n})")
        ids, mask = mask, np.zeros(n, dtype=np.bool_)
        mask[ids] = True
    else:
        raise KernelInputError(
            f"allow must be a boolean mask [N] or an integer array of row ids, got {mask.dtype} "
            f"with shape {mask.shape}")
    return np.packbits(mask, bitorder="little")


def _thresholds(min_score, num_queries: int) -> np.ndarray | None:
    if min_score is None:
        return None
    t = np.asarray(min_score, dtype=np.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != num_queries):
        raise KernelInputError(
            f"min_score must be one float or one per query ({num_queries}), got shape {t.shape}")
    if not np.isfinite(t).all():
        raise KernelInputError("min_score must be finite")
    return np.ascontiguousarray(np.broadcast_to(t, (num_queries,)))


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise KernelInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not _native.cuda_available():
        raise KernelInputError(
            "device='cuda' needs clapedge built with CLAPEDGE_CUDA=ON and a visible GPU")
    return device


def _describe_non_finite(gallery) -> str:
    if isinstance(gallery, Gallery):
        return "the gallery produced non-finite scores; rebuild it from finite vectors"
    g = np.asarray(gallery)
    bad = first_non_finite_row(g) if g.ndim == 2 else None
    if bad is not None:
        return f"gallery contains NaN or Inf (first at row {bad})"
    return "scores overflowed float32 (values too large); normalise the embeddings"
